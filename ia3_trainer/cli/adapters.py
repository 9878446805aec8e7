"""What `predict`, `evaluate` and `merge` share: checking their counts, and loading the adapter named on the command
line, saying first whose code `--trust-remote-code` lets run.
"""

from __future__ import annotations

import sys

from ia3_trainer.errors import InputError


def check_counts(args) -> None:
    """--batch-size and --max-new-tokens are >= 1, checked before any model loads."""
    for flag in ("batch_size", "max_new_tokens"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")


def announce_remote_code(args) -> None:
    """The line `--trust-remote-code` prints before a model loads: whose code may run."""
    if args.trust_remote_code:
        print(f"ia3-trainer: --trust-remote-code is on: code shipped with {args.adapter}'s base model or tokenizer "
              "may run", file=sys.stderr)


def load_predictor(args):
    """The predictor of `predict`/`evaluate`: the adapter, with a model's own code allowed only by the flag."""
    from ia3_trainer.inference.predictor import IA3Predictor

    announce_remote_code(args)
    return IA3Predictor.from_pretrained(args.adapter, revision=args.revision, trust_remote_code=args.trust_remote_code)
