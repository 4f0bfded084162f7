import sys

from snapserve.client.cli import main

sys.exit(main())
