"""``python -m safety_guard`` runs the command line."""

import sys

from safety_guard.cli.main import main

sys.exit(main())
