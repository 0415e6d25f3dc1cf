"""``python -m lowbit`` runs the command line."""

import sys

from lowbit.cli import main

sys.exit(main())
