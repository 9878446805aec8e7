"""`ia3-trainer sweep`: train a recipe at every point of a grid or a search, and print the table."""

from __future__ import annotations


def sweep_command(args) -> int:
    from ia3_trainer.errors import redact_urls
    from ia3_trainer.training.search import run_search
    from ia3_trainer.training.storage import require_optuna
    from ia3_trainer.training.sweep import summary_text

    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the table says what happened
    rows = run_search(args.recipe, grid=args.grid, search=args.search, overrides=args.overrides,
                      n_trials=args.trials, objective=args.objective, direction=args.direction, storage=args.storage,
                      study_name=args.study, pruner=optuna.pruners.NopPruner() if args.no_prune else None,
                      overwrite=args.overwrite)
    if rows:  # empty on a launch's other processes: the main one prints; a data URL without its credentials
        print(redact_urls(summary_text(rows, [item.split("=", 1)[0].strip() for item in [*args.grid, *args.search]])))
    return 0
