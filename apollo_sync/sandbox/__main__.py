"""``python -m apollo_sync.sandbox --port 8765 --rate 60``: serve the sandbox in the foreground until interrupted."""

import sys

from apollo_sync.sandbox.process import main

sys.exit(main())
