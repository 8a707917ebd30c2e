"""``python -m clap_fast.train …`` and ``torchrun -m clap_fast.train …``."""

import sys

from clap_fast.train.loop import main

sys.exit(main())
