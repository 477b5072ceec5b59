"""``python -m greenserve``: the same as the ``greenserve`` command."""

import sys

from .cli import main

sys.exit(main())
