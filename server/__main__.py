import sys

from snapserve.server.process.cli import main

sys.exit(main())
