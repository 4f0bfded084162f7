"""`python -m snapserve.trainer ...` is the same as the `trainer` console script."""

import sys

from snapserve.trainer.cli import main

sys.exit(main())
