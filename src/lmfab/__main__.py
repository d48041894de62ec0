"""``python -m lmfab`` (what torchrun and ``--num-devices`` launch)."""

import sys

from lmfab.cli import main

sys.exit(main())
