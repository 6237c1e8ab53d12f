"""``python -m search ARGS`` is ``kdsearch ARGS``."""

import sys

from search.commands.cli import main

sys.exit(main())
