"""`python -m ia3_trainer` (and `accelerate launch -m ia3_trainer`) run the CLI."""

import sys


try:
    from ia3_trainer.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while the CLI itself imports: one line, as `main` says it once it runs
    print("ia3-trainer: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
