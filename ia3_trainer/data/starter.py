"""`ia3-trainer init`: write a starter recipe for a local data file, filled in from what the file holds.

JSON has no comments, so the recipe carries a one-line `description` and `init` prints the notes a commented
template would hold: what it inferred (label set, token lengths) and what to check before training.
"""

from __future__ import annotations

import codecs
import importlib.util
from pathlib import Path
from typing import Any

from ia3_trainer.data.sources import builder_errors_unlogged
from ia3_trainer.data.splits import data_file_format
from ia3_trainer.errors import InputError, RecipeError, first_line
from ia3_trainer.recipe.loading import DataSection, safe_name
from ia3_trainer.recipe.schema import did_you_mean
from ia3_trainer.recipe.sections import DEFAULT_METRICS


DEFAULT_MODEL = "bigscience/mt0-large"


def starter_recipe(
    data_file: str | Path,
    output: str | Path,
    text_column: str = "sentence",
    label_column: str = "label",
    model: str = DEFAULT_MODEL,
    label_separator: str | None = None,
    encoding: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Build a recipe for `data_file` that will be saved at `output`; return `(recipe, notes)`.

    The label set (`data.label_names`) comes from the file when the labels are a few distinct values; otherwise
    the targets are free text and the recipe reports ROUGE. Token lengths are measured with the model's tokenizer
    when it is available without the network (a local folder or the cache), else set to safe defaults. A data file
    or model folder next to or below the recipe is written as `./...` (recipe-relative), others as absolute paths.
    A `.txt` file holds one `text<label_separator>label` line per example (the Financial PhraseBank format); the
    separator is found when every line has the same one of `@`, a tab or `|`. `encoding` (e.g. `latin-1`) reads a
    file that is not UTF-8 and is written to `data.load_kwargs`.

    Raises `FileNotFoundError` for a missing `data_file`, and `ValueError` for one that cannot be read or lacks a
    column, each naming the command-line option to change.
    """
    import datasets

    from ia3_trainer.data.labels import is_classification

    data_file = Path(data_file)
    dataset, builder, load_kwargs, label_separator = _read_data_file(
        data_file, text_column, label_column, label_separator, encoding
    )
    recipe_dir = Path(output).resolve().parent
    name = safe_name(Path(output).stem)
    notes = [f"{data_file.name}: {len(dataset)} rows"]
    data: dict[str, Any] = {
        "path": builder, "data_files": {"train": _relative(data_file, recipe_dir)}, "validation_size": 0.1,
        "text_column": text_column, "label_column": label_column,
    }
    if load_kwargs:
        data["load_kwargs"] = load_kwargs
    if label_separator is not None:
        data["label_separator"] = label_separator
        notes.append(f"each line is text{label_separator}label, split at its last {label_separator!r} "
                     "(data.label_separator)")

    feature = dataset.features[label_column]
    values = sorted(dataset.unique(label_column), key=str)
    if isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
    elif getattr(feature, "dtype", "").startswith(("int", "uint")):
        label_names = [str(i) for i in range(max(values) + 1)]
        notes.append(f"labels are integers; data.label_names is {label_names}: rename them to words (e.g. "
                     "\"negative\", \"positive\"), which the model learns faster than digits")
    elif is_classification(dataset, DataSection(path=builder, text_column=text_column, label_column=label_column)):
        label_names = [str(v) for v in values]
    else:
        label_names = None
    if label_names is not None:
        data["label_names"] = label_names
        notes.append(f"classification with {len(label_names)} labels: {', '.join(label_names)}")
    else:
        notes.append(f"{len(values)} distinct targets: free-text generation (no label set)")

    tokenizer = _local_tokenizer(model)
    targets = label_names or [str(v) for v in values]
    if tokenizer is not None:
        longest_source = max(len(ids) for ids in tokenizer([str(t) for t in dataset[text_column]])["input_ids"])
        longest_target = max(len(ids) for ids in tokenizer(text_target=targets)["input_ids"])
        data["max_source_length"] = min(longest_source, 512)
        data["max_target_length"] = longest_target if label_names else min(longest_target, 256)
        notes.append(f"lengths measured with {model}'s tokenizer: max_source_length {data['max_source_length']}, "
                     f"max_target_length {data['max_target_length']}")
    else:
        data["max_source_length"] = 128
        data["max_target_length"] = 8 if label_names else 128
        notes.append(f"{model}'s tokenizer is not available offline, so the lengths are defaults (128 and "
                     f"{data['max_target_length']}); training stops with the exact number if a label does not fit")

    metrics = list(DEFAULT_METRICS)
    if label_names is None:
        has_rouge = importlib.util.find_spec("rouge_score") is not None
        metrics = ["perplexity", "rouge"] if has_rouge else ["perplexity", "label_accuracy"]
        if not has_rouge:
            notes.append("pip install rouge-score, then add \"rouge\" to eval.metrics to score summaries")
    model_path = _relative(Path(model), recipe_dir) if Path(model).is_dir() else model
    recipe = {
        "name": name,
        "description": f"Starter recipe from ia3-trainer init: {model} on {data_file.name}; "
                       f"ia3-trainer train {Path(output).name}",
        "model": {"name_or_path": model_path},
        "ia3": {"target_modules": None, "feedforward_modules": None},
        "data": data,
        # The PEFT IA3 task guide's settings: a good first run for models of mt0-large's size.
        "training": {
            "output_dir": f"outputs/{name}", "learning_rate": 8e-3, "num_train_epochs": 3,
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "eval_strategy": "epoch",
            "save_strategy": "epoch", "save_total_limit": 2, "logging_steps": 10,
        },
        "eval": {"metrics": metrics},
    }
    return recipe, notes


def _relative(path: Path, base: Path) -> str:
    """`./x` (recipe-relative) for a file next to or below the recipe, else the absolute path."""
    path = path.resolve()
    return f"./{path.relative_to(base).as_posix()}" if path.is_relative_to(base) else str(path)


def _local_tokenizer(model: str):
    """The model's tokenizer when it is on this machine; never runs code shipped with the model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def _read_data_file(data_file: Path, text_column: str, label_column: str, separator: str | None,
                    encoding: str | None):
    """`(dataset, builder, load_kwargs, separator)` of the file `init` reads, its two columns checked; each
    problem is one line naming the option to change."""
    import datasets

    from ia3_trainer.data.splits import check_columns, split_lines

    builder, load_kwargs = data_file_format(data_file, "--data")
    if encoding:
        check_encoding(encoding)
    load_kwargs = {**load_kwargs, **({"encoding": encoding} if encoding else {})}
    if builder != "text" and separator is not None:
        raise InputError(f"--label-separator: only for .txt files (text<SEP>label lines), not {data_file.name}")
    if builder == "text" and separator is None:
        separator = _find_separator(data_file, encoding or "utf-8")
    section = DataSection(path=builder, text_column=text_column, label_column=label_column, label_separator=separator)
    try:
        with builder_errors_unlogged():
            dataset = datasets.load_dataset(builder, data_files=str(data_file), split="train", **load_kwargs)
        if builder == "text":
            dataset = split_lines(dataset, section, "train")
    except UnicodeDecodeError as error:
        raise InputError(not_utf8_option(data_file, error)) from error
    except RecipeError as error:
        raise InputError(_as_options(error, data_file)) from error
    except (ValueError, OSError, StopIteration, datasets.exceptions.DatasetGenerationError) as error:
        # datasets 5 raises StopIteration for an empty json file
        if isinstance(error.__cause__, UnicodeDecodeError):
            raise InputError(not_utf8_option(data_file, error.__cause__)) from error
        if not data_file.read_bytes().strip():
            raise InputError(f"--data: {data_file.name} is empty; write one example a line"
                             + (", after a header line naming the columns" if builder == "csv" else "")) from error
        if not str(error) or "corresponds to no data" in str(error):  # datasets' words for a header and no rows
            raise InputError(f"--data: {data_file.name} has no examples, only"
                             + (" a header line" if builder == "csv" else " empty lines")
                             + "; write one example a line") from error
        raise InputError(f"--data: cannot read {data_file.name} as {builder}: {first_line(error)}") from error
    for flag, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in dataset.column_names:
            hint = did_you_mean(column, dataset.column_names)
            raise InputError(
                f"{flag}: no column {column!r} in {data_file.name}{hint} (columns: {dataset.column_names})"
            )
    try:
        check_columns(dataset, section, data_file.name)  # also decodes both columns: a bad byte shows here
    except UnicodeDecodeError as error:
        raise InputError(not_utf8_option(data_file, error)) from error
    except RecipeError as error:
        raise InputError(_as_options(error, data_file)) from error
    return dataset, builder, load_kwargs, separator


def check_encoding(encoding: str) -> None:
    """`encoding` names a text encoding Python has (rot13 and base64 are codecs, but not of text)."""
    try:
        codecs.lookup(encoding)
        "a".encode(encoding)
    except LookupError:
        raise InputError(f"--encoding: unknown text encoding {encoding!r}; name the file's encoding as Python does, "
                         "e.g. --encoding latin-1 or --encoding cp1252") from None
    except UnicodeError:  # a text encoding without "a" in it
        pass


def _find_separator(path: Path, encoding: str) -> str:
    """The one of `@`, tab and `|` that every non-empty line of a .txt file has (phrasebank lines end `@label`)."""
    try:
        lines = [line for line in path.read_text(encoding=encoding).splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise InputError(not_utf8_option(path, error)) from error
    for candidate in ("@", "\t", "|"):
        if lines and all(candidate in line for line in lines):
            return candidate
    raise InputError(f"--label-separator: {path.name}: no separator that every line has (tried '@', tab, '|'); pass "
                     "the one between each text and its label, e.g. --label-separator @")


def not_utf8_option(path: Path, error: UnicodeDecodeError) -> str:
    """The message for a `--data` file (of `init` or `evaluate`) that is not UTF-8 text."""
    return (f"--data: {path.name} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8, or pass "
            "its --encoding, e.g. --encoding latin-1")


def _as_options(error: RecipeError, path: Path) -> str:
    """A data check's message in `init`'s terms: the command-line option instead of the recipe key."""
    message = str(error).replace(f"split {path.name!r}", path.name)
    for key, flag in (("data.text_column", "--text-column"), ("data.label_column", "--label-column"),
                      ("data.label_separator", "--label-separator")):
        message = message.replace(key, flag)
    return message
