"""``python -m clipforge.pretrain`` and ``torchrun -m clipforge.pretrain``."""

import sys

from clipforge.pretrain.cli import main

sys.exit(main())
