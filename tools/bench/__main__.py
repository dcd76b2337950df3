"""``python -m dpipes.tools.bench``: the same as ``dpipes-bench``."""

import sys

from dpipes.tools.bench.cli import main

sys.exit(main())
