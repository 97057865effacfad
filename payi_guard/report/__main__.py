"""``python -m payi_guard.report LOG... [options]`` runs ``payi-guard report``."""

import sys

from payi_guard.cli import report_main

sys.exit(report_main())
