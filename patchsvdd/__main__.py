"""``python -m patchsvdd ...``: the same command line as ``patchsvdd ...``."""

import sys

from .cli import main

sys.exit(main())
