"""OpenFL's own director, passing every experiment on to the envoys without any check (as a compromised
director would), for tests/test_site_guard.py: ``python tests/passing_director.py director start ...``.

Only two of the project's patches of the director process (``federated/openfl/fx.py``), so that a test can send one
refused experiment after another: the fixed waits cut, and an experiment a site refused kept failed (OpenFL's
own director would hand it to that site again and again). None of the site guard.
"""

from __future__ import annotations

import sys

from patchsvdd.federated.openfl.fx import cut_fixed_waits, keep_site_failures

if __name__ == "__main__":
    cut_fixed_waits()
    keep_site_failures()
    from openfl.interface.cli import entry

    sys.argv = ["fx", *sys.argv[1:]]
    entry()
