"""``python -m payi_guard`` runs the ``payi-guard`` command."""

import sys

from payi_guard.cli import main

sys.exit(main())
