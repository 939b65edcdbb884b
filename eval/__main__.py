"""``python -m clipforge.eval`` == ``clipforge-eval``."""

import sys

from clipforge.eval.cli import main

sys.exit(main())
