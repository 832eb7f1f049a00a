"""``python -m sarvit ...``: the same as the ``sarvit`` command."""

import sys

from .cli import main

sys.exit(main())
