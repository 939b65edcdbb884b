"""``python -m clipforge.index`` == ``clipforge-index``."""

import sys

from clipforge.index.cli import main

sys.exit(main())
