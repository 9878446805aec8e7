"""`python -m ia3_trainer.cli` runs the CLI."""

import sys

from ia3_trainer.cli.main import main


sys.exit(main())
