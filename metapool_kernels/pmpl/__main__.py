"""``python -m metapool_kernels.pmpl search|retrain|eval`` (see :mod:`metapool_kernels.pmpl.cli`)."""
import sys

from .cli import main

sys.exit(main())
