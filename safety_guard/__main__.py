"""``python -m safety_guard`` runs the command line."""

import sys

from .cli import main

sys.exit(main())
