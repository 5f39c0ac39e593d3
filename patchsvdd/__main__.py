"""``python -m patchsvdd ...``: the same command line as ``patchsvdd ...``."""

import sys

from patchsvdd.cli.main import main

sys.exit(main())
