"""Command line: `ia3-trainer train | validate | list | sweep | init | predict | evaluate | merge | push`.

Every bad input exits 2 with one message, no traceback: an [`IA3TrainerError`] (what the package raises for what
it is given) prints as `ia3-trainer: error: ...`, a [`RecipeError`] one line per problem, with the Python argument
names said as this command line's flags (`_CLI_WORDS`) and any token taken out (`errors.redact`). Any other
exception is a bug: its traceback, then one line saying how to report it (exit 1). Set `IA3_TRAINER_DEBUG=1` to get
the traceback of a bad input too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from ia3_trainer.cli.evaluate import evaluate_command
from ia3_trainer.cli.init import init_command
from ia3_trainer.cli.listing import list_architectures_command, list_command
from ia3_trainer.cli.merge import merge_command
from ia3_trainer.cli.predict import predict_command
from ia3_trainer.cli.push import push_command
from ia3_trainer.cli.sweep import sweep_command
from ia3_trainer.cli.train import train_command
from ia3_trainer.errors import IA3TrainerError, redact
from ia3_trainer.processes import is_main_process, quiet_other_processes, single_process_note
from ia3_trainer.recipe.loading import load_recipe


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own messages quote what was typed, a token too
        super().error(redact(message))


def build_parser() -> argparse.ArgumentParser:
    from ia3_trainer import __version__
    from ia3_trainer.data.starter import DEFAULT_MODEL

    parser = _Parser(
        prog="ia3-trainer", description="Fine-tune seq2seq models with IA3 from JSON recipes."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("recipe", help="a shipped recipe name (see `ia3-trainer list`) or a JSON file")
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a recipe field, e.g. --set training.learning_rate=1e-2 (value parsed as JSON)",
        )
        return sub

    train = with_recipe("train", "Train an IA3 adapter from a recipe and save it to training.output_dir.")
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true",
        help="continue the run in training.output_dir from its newest whole checkpoint-N (e.g. after a crash); the "
             "recipe may differ only in the length of the run, logging, evaluation, saving, hub and speed settings",
    )
    start.add_argument(
        "--overwrite", action="store_true",
        help="replace the run in training.output_dir: remove the files a run writes there (adapter, checkpoints, "
             "metadata, results), keep any others, then train",
    )
    with_recipe("validate", "Check a recipe and print it resolved, without loading any model or library (train also "
                            "runs transformers' own checks of the training section).")
    commands.add_parser("list", help="List the shipped recipes.", description="List the shipped recipes.")
    commands.add_parser(
        "list-architectures", help="List the IA3 target modules chosen for each model family.",
        description="List, for each model_type, the IA3 target_modules and feedforward_modules used when a recipe "
                    "leaves them null, and whether peft or ia3-trainer chose them.",
    )
    sweep = with_recipe("sweep", "Search a recipe's hyperparameters in an Optuna study (an exact --grid or sampled "
                                 "--search ranges), each trial in its own folder, and print a table.")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="values of one field, e.g. training.learning_rate=3e-3,8e-3; repeat for a product")
    sweep.add_argument("--search", action="append", default=[], metavar="KEY=KIND:...",
                       help="a field to sample: KEY=log:LOW:HIGH (float, log scale), float:LOW:HIGH, int:LOW:HIGH or "
                            "choice:V1,V2 (values as JSON), e.g. training.learning_rate=log:1e-4:3e-2; repeatable")
    sweep.add_argument("--trials", type=int, metavar="N", help="--search trials, over all workers (default 20)")
    sweep.add_argument("--objective", metavar="METRIC", help="e.g. eval_loss (default: metric_for_best_model, else "
                       "eval_label_accuracy, else eval_loss)")
    sweep.add_argument("--direction", choices=["maximize", "minimize"], help="default: minimize a loss, else maximize")
    sweep.add_argument("--storage", metavar="URL", help="SQLAlchemy URL (postgresql://user@host/db) or journal:PATH; "
                       "workers with the same storage and study share it (default: sqlite:///<output_dir>/study.db)")
    sweep.add_argument("--study", metavar="NAME", help="the study's name (default: the recipe's name)")
    sweep.add_argument("--no-prune", action="store_true", help="no median pruner: every trial trains to its end")
    sweep.add_argument("--overwrite", action="store_true",
                       help="start over: delete the study, and let trials replace the runs in their folders")
    init = commands.add_parser(
        "init", help="Write a starter recipe for a local data file.",
        description="Write a starter recipe for a csv, tsv, json, jsonl, parquet or txt (text<SEP>label lines) file, "
                    "with the label set and token lengths read from the file, and print what to check before "
                    "training.",
    )
    init.add_argument("--data", required=True, metavar="FILE", help="the training data file")
    init.add_argument("--text-column", default="sentence", help="source text column (default: sentence)")
    init.add_argument("--label-column", default="label", help="target column (default: label)")
    init.add_argument("--model", default=DEFAULT_MODEL, help="seq2seq model: Hub id or folder (default: %(default)s)")
    init.add_argument("--label-separator", metavar="SEP",
                      help="for a .txt file of text<SEP>label lines, e.g. @ (default: the one of @, tab, | that every "
                           "line has)")
    init.add_argument("--encoding", help="the file's text encoding when it is not UTF-8, e.g. latin-1")
    init.add_argument("-o", "--output", metavar="FILE", help="where to write the recipe (default: <data>-ia3.json)")
    init.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    _add_adapter_commands(commands)
    push = commands.add_parser(
        "push", help="Push a finished run's adapter (never the base model) to the Hugging Face Hub.",
        description="Push the adapter, tokenizer, recipe.json, inference.json, metrics and a model card of "
                    "OUTPUT_DIR to REPO_ID. OUTPUT_DIR is only read: the card and metrics.json are written into a "
                    "temporary copy, which is uploaded. The token comes from HF_TOKEN or `hf auth login`. Each "
                    "request to the Hub times out after IA3_TRAINER_HUB_TIMEOUT seconds (default 60).",
    )
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output_dir or one of its checkpoint-* folders")
    push.add_argument("repo_id", metavar="REPO_ID", help="user/name of the adapter repo (created private if missing)")
    push.add_argument("--public", action="store_true", help="create the repo public")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_other_processes()  # under a launcher, before any library loads: they read the levels it sets
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command in ("train", "sweep") and (note := single_process_note()):
            print(note, file=sys.stderr)
        # train switches the bars once its recipe is read: a bad recipe or --set answers before any library loads.
        with _progress_bars_on_terminals_only(args.command not in (*_QUICK_COMMANDS, "train")):
            return _run(parser, args)
    except KeyboardInterrupt:  # Ctrl-C while the libraries import, before a command runs (`_run` handles the rest)
        if os.environ.get("IA3_TRAINER_DEBUG", "") not in ("", "0"):
            raise
        if is_main_process():
            print("ia3-trainer: interrupted", file=sys.stderr)
        return 130


def _run(parser: argparse.ArgumentParser, args) -> int:
    recipe = None
    try:
        if args.command == "list":
            return list_command()
        if args.command == "list-architectures":
            return list_architectures_command()
        if args.command in ("init", "predict", "evaluate"):
            command = {"init": init_command, "predict": predict_command, "evaluate": evaluate_command}[args.command]
            return command(args)
        if args.command == "sweep":
            return sweep_command(args)
        if args.command == "push":
            return push_command(args.output_dir, args.repo_id, private=not args.public)
        if args.command in _ADAPTER_COMMANDS:
            return _ADAPTER_COMMANDS[args.command](args)
        # validate leaves out the checks transformers makes itself (importing it takes seconds); train makes them.
        recipe = load_recipe(args.recipe, args.overrides, library_checks=args.command == "train")
        if args.command == "validate":
            print(json.dumps(recipe.to_dict(), indent=2))
            print(f"Recipe OK: {recipe.name}")
            return 0
        with _progress_bars_on_terminals_only():  # from here on, libraries load
            return train_command(recipe, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, and how to go on
        if os.environ.get("IA3_TRAINER_DEBUG", "") not in ("", "0"):
            raise
        if is_main_process():  # under a launcher, the first process speaks for all
            _close_progress_bars()
            # An interrupt that says what it stopped (the wait for the Hub: lifecycle.wait_for_pushes) says it.
            line = f"ia3-trainer: {interrupt}" if str(interrupt) else _interrupted(args, recipe, interrupt)
            print(redact(line), file=sys.stderr)
        return 130
    except IA3TrainerError as error:  # bad input: a recipe, data, a run folder, the Hub, a file or an argument
        if os.environ.get("IA3_TRAINER_DEBUG", "") not in ("", "0"):
            raise
        parser.exit(2, redact(f"ia3-trainer: error: {error.describe(_CLI_WORDS)}\n"))
    except Exception as error:  # anything else is a bug in ia3-trainer (or in a library it calls): say so
        import traceback

        print(redact("".join(traceback.format_exception(error))), end="", file=sys.stderr)
        print(redact(f"ia3-trainer: internal error ({type(error).__name__}); this is a bug, unless it says the "
                     f"machine ran out of memory or disk: please report it with the traceback above at {_ISSUES}"),
              file=sys.stderr)
        return 1


_ISSUES = "https://github.com/ia3-trainer/ia3-trainer/issues"


# How the command line says what an error names by its Python argument (in an error's key and fix), longest first.
_CLI_WORDS = {
    "set training.overwrite_output_dir and train() without resume_from_checkpoint": "train with --overwrite",
    "train() without resume_from_checkpoint": "train without --resume",
    "train(resume_from_checkpoint=True)": "pass --resume",
    "set training.overwrite_output_dir": "pass --overwrite",
    "overwrite=True": "--overwrite",
    "merged_dir": "MERGED_DIR",
    "push again": "run the same command again",
}


_QUICK_COMMANDS = ("list", "list-architectures", "validate")  # they load no library that draws progress bars


@contextlib.contextmanager
def _progress_bars_on_terminals_only(applies: bool = True):
    """While a command runs with stderr not a terminal (a log file), the progress bars of datasets, huggingface_hub
    and transformers (downloads, loading, `map`) are off: a file keeps each redraw as a carriage-return line. The
    trainer's own bars follow `training.disable_tqdm` (`IA3TrainingArguments`: off too, unless the recipe sets it).
    What was on before is turned on again after."""
    if not applies:
        yield
        return
    from ia3_trainer.recipe.training_args import stderr_is_terminal

    if stderr_is_terminal():
        yield
        return
    import datasets
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    switches = [
        (datasets.is_progress_bar_enabled(), datasets.disable_progress_bars, datasets.enable_progress_bars),
        (not hub_utils.are_progress_bars_disabled(), hub_utils.disable_progress_bars, hub_utils.enable_progress_bars),
        (transformers_logging.is_progress_bar_enabled(), transformers_logging.disable_progress_bar,
         transformers_logging.enable_progress_bar),
    ]
    for enabled, disable, _ in switches:
        if enabled:
            disable()
    try:
        yield
    finally:
        for enabled, _, enable in switches:
            if enabled:
                enable()


def _interrupted(args, recipe, interrupt: BaseException | None = None) -> str:
    """The line Ctrl-C prints: for `train`, the newest whole checkpoint now (rotation may have removed the one saved
    before it) and the command that continues from it; once training ended, that the run is complete."""
    from ia3_trainer.training.lifecycle import RunCompleteInterrupt

    if isinstance(interrupt, RunCompleteInterrupt):
        saved = f"the adapter is saved in {interrupt.output_dir}" if interrupt.adapter_saved else "training finished"
        return (f"ia3-trainer: interrupted after the run completed ({saved}); there is nothing to resume; its results "
                f"and report may be incomplete (ia3-trainer evaluate {interrupt.output_dir} writes the report)")
    if args.command != "train" or recipe is None:
        return "ia3-trainer: interrupted"
    import shlex

    from ia3_trainer.training.checkpoints import last_checkpoint

    output_dir = recipe.training["output_dir"]
    command = ["ia3-trainer", "train", args.recipe, *(part for item in args.overrides for part in ("--set", item))]
    checkpoint = last_checkpoint(output_dir)
    if checkpoint is None:
        return (f"ia3-trainer: interrupted before the first checkpoint in {output_dir}; start over with: "
                f"{shlex.join([*command, '--overwrite'])}")
    return (f"ia3-trainer: interrupted; the last checkpoint is {checkpoint}; continue with: "
            f"{shlex.join([*command, '--resume'])}")


def _close_progress_bars() -> None:
    """End the open progress bars on their own line now; tqdm would close them at exit, after the last line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _add_adapter_commands(commands) -> None:
    def with_adapter(name: str, help_: str, overwrite: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("adapter", metavar="OUTPUT_DIR_OR_REPO",
                         help="a training output_dir (or one of its checkpoint-N folders) or a Hub repo id")
        sub.add_argument("--revision", help="branch, tag or commit of a Hub adapter repo")
        sub.add_argument("--overwrite", action="store_true", help=overwrite)
        sub.add_argument("--trust-remote-code", action="store_true",
                         help="run Python code shipped with the base model or tokenizer (read it first); what the "
                         "adapter's own recipe.json says never turns this on")
        return sub

    predict = with_adapter("predict", "Generate the label of each text with a trained adapter.",
                           "replace the --output file if it exists")
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    predict.add_argument("--file", help="more texts: a .jsonl file (one object a line) or a text file (one a line)")
    predict.add_argument("--text-column", help="field of a .jsonl --file that holds the text (default: the recipe's "
                         "data.text_column)")
    predict.add_argument("--output", help="write the predictions to this JSONL file instead of printing them")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--max-new-tokens", type=int, help="generation bound (default: the longest label)")

    evaluate = with_adapter("evaluate", "Evaluate a trained adapter and write eval_report.json plus PNG plots.",
                            "replace the report files (eval_report.json, its PNGs) already in the output folder")
    evaluate.add_argument("--data", metavar="FILE", help="a .csv, .json, .jsonl, .parquet or .txt file with the "
                          "recipe's text and label columns (default: the recipe's validation split)")
    evaluate.add_argument("--output-dir", help="where to write the report (default: the adapter folder; the current "
                          "folder for a Hub repo)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--encoding", help="the --data file's text encoding when it is not UTF-8 (default: the "
                          "recipe's data.load_kwargs encoding), e.g. latin-1")

    merge = with_adapter("merge", "Fold the IA3 vectors into the base weights and save a plain transformers model.",
                         "replace the model in MERGED_DIR (an earlier merge)")
    merge.add_argument("merged_dir", metavar="MERGED_DIR", help="a new or empty folder for the merged model and its "
                       "tokenizer")


_ADAPTER_COMMANDS = {"merge": merge_command}


if __name__ == "__main__":
    sys.exit(main())
