"""`python -m lmforge` (and `torchrun -m lmforge`) run the CLI."""

import sys

from .cli import main

sys.exit(main())
