"""Train with T-Few's objective from a recipe that has a `tfew` section.

    python examples/tfew/train.py examples/tfew/recipe.json --set tfew.unlikelihood_weight=0.5

`ia3-trainer train` cannot run this recipe: it does not know the `tfew` section (recipes hold no import paths),
so this script is the entry point, exactly as it would be in a user's own project.
"""

import argparse
import json
import sys
from pathlib import Path

from ia3_trainer import RecipeError


sys.path.insert(0, str(Path(__file__).resolve().parent))  # find tfew.py when run from anywhere

from tfew import TFewTrainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train an IA3 adapter with T-Few's losses.")
    parser.add_argument("recipe", nargs="?", default=str(Path(__file__).with_name("recipe.json")))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        trainer = TFewTrainer.from_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    metrics = dict(trainer.train().metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
