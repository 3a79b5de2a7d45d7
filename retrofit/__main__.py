"""``python -m retrofit``: the command line (:mod:`retrofit.cli`)."""

import sys

from .cli import main

sys.exit(main())
