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

from .errors import IA3TrainerError, InputError, PathError, redact
from .jsonfiles import read_json
from .recipe import list_shipped_recipes, load_recipe, load_saved_recipe


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own messages quote what was typed, a token too
        super().error(redact(message))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .starter import DEFAULT_MODEL

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
    with_recipe("validate", "Check a recipe and print it resolved, without loading any model.")
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
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        with _progress_bars_on_terminals_only(args.command not in _QUICK_COMMANDS):
            return _run(parser, args)
    except KeyboardInterrupt:  # Ctrl-C while the libraries import, before a command runs (`_run` handles the rest)
        if os.environ.get("IA3_TRAINER_DEBUG", "") not in ("", "0"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print("ia3-trainer: interrupted", file=sys.stderr)
        return 130


def _run(parser: argparse.ArgumentParser, args) -> int:
    recipe = None
    try:
        if args.command == "list":
            return _list()
        if args.command == "list-architectures":
            return _list_architectures()
        if args.command in ("init", "predict", "evaluate"):
            from . import commands

            return getattr(commands, args.command)(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "push":
            return _push(args.output_dir, args.repo_id, private=not args.public)
        if args.command in _ADAPTER_COMMANDS:
            return _ADAPTER_COMMANDS[args.command](args)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            print(json.dumps(recipe.to_dict(), indent=2))
            print(f"Recipe OK: {recipe.name}")
            return 0
        return _train(recipe, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, and how to go on
        if os.environ.get("IA3_TRAINER_DEBUG", "") not in ("", "0"):
            raise
        if os.environ.get("RANK", "0") == "0":  # under a launcher, the first process speaks for all
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
    from .training_args import stderr_is_terminal

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


def _list() -> int:
    for name, path in list_shipped_recipes().items():
        description = read_json(path).get("description", "")
        print(f"{name:32} {description}")
    return 0


def _list_architectures() -> int:
    from .architectures import IA3_TARGETS, origin

    print(f"{'model_type':20} {'origin':13} target_modules / feedforward_modules")
    for model_type, (targets, feedforward) in sorted(IA3_TARGETS.items()):
        print(f"{model_type:20} {origin(model_type):13} {json.dumps(targets)} / {json.dumps(feedforward)}")
    return 0


def _interrupted(args, recipe, interrupt: BaseException | None = None) -> str:
    """The line Ctrl-C prints: for `train`, the newest whole checkpoint now (rotation may have removed the one saved
    before it) and the command that continues from it; once training ended, that the run is complete."""
    from .lifecycle import RunCompleteInterrupt

    if isinstance(interrupt, RunCompleteInterrupt):
        saved = f"the adapter is saved in {interrupt.output_dir}" if interrupt.adapter_saved else "training finished"
        return (f"ia3-trainer: interrupted after the run completed ({saved}); there is nothing to resume; its results "
                f"and report may be incomplete (ia3-trainer evaluate {interrupt.output_dir} writes the report)")
    if args.command != "train" or recipe is None:
        return "ia3-trainer: interrupted"
    import shlex

    from .checkpoints import last_checkpoint

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


def _train(recipe, resume: bool = False, overwrite: bool = False) -> int:
    """`train`: the run is `IA3Seq2SeqTrainer.from_recipe(recipe).train()` (`ia3_trainer.lifecycle`); this prints
    what it returns."""
    from .runs import check_output_dir
    from .trainer import IA3Seq2SeqTrainer

    training = recipe.training_args()
    # One rule: --resume takes the newest whole checkpoint; else a recipe's training.resume_from_checkpoint path.
    resume_from = True if resume else training.resume_from_checkpoint
    overwrite = overwrite or training.overwrite_output_dir
    # The folder's rules, before the data and the model load (the run claims it when it starts).
    check_output_dir(training, recipe.to_dict(), resume=resume_from, overwrite=overwrite)
    if recipe.model.trust_remote_code and training.process_index == 0:
        print(f"ia3-trainer: model.trust_remote_code is on: code from {recipe.model.name_or_path} will run")
    trainer = IA3Seq2SeqTrainer.from_recipe(recipe)
    trainer.args.overwrite_output_dir = overwrite  # --overwrite: for this run, not written into its recipe.json

    def print_results(output) -> None:
        print(_summary(output.metrics, trainer.args.output_dir))
        if output.report_paths:
            print(_report_summary(output.report, output.report_paths))

    trainer.train(resume_from_checkpoint=resume_from, on_results=print_results)
    return 0


def _push(output_dir: str, repo_id: str, private: bool) -> int:
    from pathlib import Path

    from .network import request_timeout
    from .recipe import check_repo_id
    from .upload import push_adapter_folder

    folder = Path(output_dir)
    problem = check_repo_id(repo_id)  # a malformed id, told apart from the Hub's own refusals (HTTP 400) below
    if problem:
        raise InputError(key="REPO_ID", problem=problem)
    timeout = request_timeout()  # a bad IA3_TRAINER_HUB_TIMEOUT is said as such, not as a network problem
    if not (folder / "adapter_config.json").is_file():
        raise PathError(key="OUTPUT_DIR", problem=f"{folder} holds no adapter_config.json",
                        fix="pass the output_dir of a finished run")
    load_saved_recipe(folder)  # the card reads recipe.json: a bad one fails here, in one line
    results = folder / "all_results.json"
    metrics = read_json(results, allow_nan=True) if results.is_file() else None
    # push_adapter_folder uploads a staged copy (with the card and metrics.json) and removes it whatever happens:
    # the folder is only read. What the Hub or the network refuses is a HubError, said in one line.
    try:
        commit = push_adapter_folder(folder, repo_id, private=private, metrics=metrics,
                                     commit_message="Upload adapter", timeout=timeout)
    except KeyboardInterrupt:
        print(redact(f"ia3-trainer: interrupted: the push to {repo_id} did not finish; {folder} is unchanged; run the "
                     "same command again to push it"), file=sys.stderr)
        raise SystemExit(130) from None
    print(f"Pushed {folder} to {commit.commit_url}")
    return 0


def _sweep(args) -> int:
    from .search import require_optuna, run_search
    from .sweep import summary_text

    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the table says what happened
    rows = run_search(args.recipe, grid=args.grid, search=args.search, overrides=args.overrides,
                      n_trials=args.trials, objective=args.objective, direction=args.direction, storage=args.storage,
                      study_name=args.study, pruner=optuna.pruners.NopPruner() if args.no_prune else None,
                      overwrite=args.overwrite)
    if rows:  # empty on a launch's other processes: the main one prints
        print(summary_text(rows, [item.split("=", 1)[0].strip() for item in [*args.grid, *args.search]]))
    return 0


def _summary(metrics: dict, output_dir: str) -> str:
    keys = [
        "train_loss", "train_perplexity", "eval_loss", "eval_perplexity", "eval_label_accuracy", "eval_rank_accuracy"
    ]
    shown = "  ".join(f"{key}={metrics[key]:.4f}" for key in keys if key in metrics)
    return f"{shown}\nadapter, tokenizer and recipe.json saved to {output_dir}"


# --- using a trained adapter: predict / evaluate / merge ----------------------------------------------------------


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

    merge = with_adapter("merge", "Fold the IA3 vectors into the base weights and save a plain transformers model.",
                         "replace the model in MERGED_DIR (an earlier merge)")
    merge.add_argument("merged_dir", metavar="MERGED_DIR", help="a new or empty folder for the merged model and its "
                       "tokenizer")


def _merge(args) -> int:
    from .commands import announce_remote_code
    from .predictor import merge_adapter

    announce_remote_code(args)
    path = merge_adapter(args.adapter, args.merged_dir, revision=args.revision, overwrite=args.overwrite,
                         trust_remote_code=args.trust_remote_code)
    print(f"merged model and tokenizer saved to {path}; load it with AutoModelForSeq2SeqLM.from_pretrained")
    return 0


def _report_summary(report: dict, paths) -> str:
    from .report import summary_text

    return summary_text(report, paths)


_ADAPTER_COMMANDS = {"merge": _merge}


if __name__ == "__main__":
    sys.exit(main())
