"""``python -m clipforge.data_tools`` is ``clipforge-data``."""

import sys

from clipforge.data_tools.cli import main

sys.exit(main())
