"""`python -m ia3_trainer` (and `accelerate launch -m ia3_trainer`) run the CLI."""

import sys

from .cli import main


sys.exit(main())
