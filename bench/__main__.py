"""``python -m bench [--smoke] [--output FILE] [--doc FILE] [--only SCENARIO ...]``."""

import sys

from bench.runner import main

sys.exit(main())
