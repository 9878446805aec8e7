"""Command line: `ia3-trainer train | validate | list`. Every bad input exits 2 with one message, no traceback."""

from __future__ import annotations

import argparse
import json
import sys

from .recipe import RecipeError, list_shipped_recipes, load_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ia3-trainer", description="Fine-tune seq2seq models with IA3 from JSON recipes."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("recipe", help="a shipped recipe name (see `ia3-trainer list`) or a JSON file")
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a recipe field, e.g. --set training.learning_rate=1e-2 (value parsed as JSON)",
        )
        return sub

    with_recipe("train", "Train an IA3 adapter from a recipe and save it to training.output_dir.")
    with_recipe("validate", "Check a recipe and print it resolved, without loading any model.")
    commands.add_parser("list", help="List the shipped recipes.", description="List the shipped recipes.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            print(json.dumps(recipe.to_dict(), indent=2))
            print(f"Recipe OK: {recipe.name}")
            return 0
        return _train(recipe)
    except RecipeError as error:
        parser.exit(2, f"ia3-trainer: error: {error}\n")


def _list() -> int:
    for name, path in list_shipped_recipes().items():
        description = json.loads(path.read_text(encoding="utf-8")).get("description", "")
        print(f"{name:32} {description}")
    return 0


def _train(recipe) -> int:
    from .trainer import IA3Seq2SeqTrainer

    if recipe.model.trust_remote_code:
        print(f"ia3-trainer: model.trust_remote_code is on: code from {recipe.model.name_or_path} will run")
    trainer = IA3Seq2SeqTrainer.from_recipe(recipe)
    result = trainer.train()
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics)
        print(_summary(metrics, trainer.args.output_dir))
    return 0


def _summary(metrics: dict, output_dir: str) -> str:
    keys = ["train_loss", "train_perplexity", "eval_loss", "eval_perplexity", "eval_label_accuracy"]
    shown = "  ".join(f"{key}={metrics[key]:.4f}" for key in keys if key in metrics)
    return f"{shown}\nadapter, tokenizer and recipe.json saved to {output_dir}"


if __name__ == "__main__":
    sys.exit(main())
