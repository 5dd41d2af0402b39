"""``python -m graphprune``: the command line (see ``graphprune.app.cli``)."""

import sys

from .app.cli import main

sys.exit(main())
