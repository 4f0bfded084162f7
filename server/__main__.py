import sys

from snapserve.server.cli import main

sys.exit(main())
