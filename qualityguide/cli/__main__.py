"""``python -m qualityguide.cli``: the same command line as the ``qualityguide`` script."""

import sys

from .commands import main

sys.exit(main())
