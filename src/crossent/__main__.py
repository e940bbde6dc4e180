"""``python -m crossent`` is the ``crossent`` command (``python -m crossent demo``)."""

import sys

from .cli import main

sys.exit(main())
