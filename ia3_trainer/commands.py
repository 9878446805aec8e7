"""What `ia3-trainer init`, `predict` and `evaluate` do with their parsed arguments (`ia3_trainer.cli` parses and
dispatches). Arguments and files are checked before any model loads; every problem is one `InputError` or `PathError`
that names the option, which the CLI prints as one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import InputError, PathError, RecipeError, first_line
from .jsonfiles import write_text
from .recipe import Recipe


def init(args) -> int:
    """`ia3-trainer init`: write a starter recipe for a data file and print what to check."""
    from .starter import starter_recipe

    output = Path(args.output or f"{Path(args.data).stem}-ia3.json")
    _check_replaceable(output, Path(args.data), args.force)
    recipe, notes = starter_recipe(args.data, output, args.text_column, args.label_column, args.model,
                                   label_separator=args.label_separator, encoding=args.encoding)
    text = json.dumps(recipe, indent=2) + "\n"
    # What init writes must validate, as the file it will be (relative paths resolve against it), before it replaces
    # anything with --force.
    Recipe.from_dict(json.loads(text), source=output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text(output, text)
    print(f"Wrote {output}")
    print("\n".join(f"  - {note}" for note in notes))
    print("  - training: the PEFT IA3 guide's settings (lr 8e-3, 3 epochs, batch 8); see README 'Recipes'")
    print(f"Next: ia3-trainer validate {output} && ia3-trainer train {output}")
    return 0


def _check_replaceable(output: Path, data: Path, force: bool) -> None:
    """`init` writes a new file, or with `--force` replaces a recipe written before: never the data file it reads, a
    model's `config.json` or any other file that is not a recipe."""
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise PathError(f"--output: {output} exists; choose another file or pass --force")
    if output.is_dir():
        raise PathError(f"--output: {output} is a folder; give the recipe file to write, e.g. "
                                f"{output / (data.stem + '-ia3.json')}")
    if data.exists() and output.resolve() == data.resolve():
        raise PathError(f"--output: {output} is the data file --data reads; write the recipe to another file, "
                              f"e.g. {data.stem}-ia3.json")
    model = next((name for name in ("adapter_config.json", "config.json") if (output.parent / name).is_file()), None)
    if model is not None:
        raise PathError(f"--output: {output} is in a model or adapter folder (it holds {model}); --force "
                              "replaces only a recipe of yours: write the recipe to another file")
    if not _is_recipe(output):
        raise PathError(f"--output: {output} exists and is not a recipe (--force replaces only a recipe "
                              "written before, never a data or model file); choose another file")


def _is_recipe(path: Path) -> bool:
    """Whether `path` holds a recipe: a JSON object with `model` and `data` sections and only sections besides."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("data"), dict)
            and all(isinstance(value, dict) or (key in ("name", "description") and (value is None or isinstance(
                value, str))) for key, value in raw.items()))


def _check_counts(args) -> None:
    """--batch-size and --max-new-tokens are >= 1, checked before any model loads."""
    for flag in ("batch_size", "max_new_tokens"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")


def predict(args) -> int:
    """`ia3-trainer predict`: one JSON line per text, printed or written whole to --output."""
    from .predictor import check_texts

    rows = _read_text_file(args.file) if args.file else []
    if not args.texts and not rows:
        raise InputError("predict: no texts; give TEXT arguments or --file FILE")
    check_texts(args.texts)  # before the model loads, which can take minutes
    _check_counts(args)
    if args.output:  # so is an --output that cannot be written: checked before predicting, written whole at the end
        _check_output_file(args.output, args.overwrite)
    predictor = load_predictor(args)
    data = predictor.settings.data
    column = args.text_column or (data.text_column if data is not None else "text")
    # Each output line is its input (a JSONL row keeps all its fields) plus "prediction".
    records, texts = [{"text": text} for text in args.texts], list(args.texts)
    for number, row in enumerate(rows, 1):
        if isinstance(row, str):
            records.append({"text": row})
            texts.append(row)
        elif isinstance(row, dict) and isinstance(row.get(column), str):
            records.append(row)
            texts.append(row[column])
        else:
            raise InputError(f"{args.file}: line {number}: has no text field {column!r}; set --text-column")
    predictions = predictor.predict(texts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    lines = [json.dumps({**record, "prediction": prediction}, ensure_ascii=False)
             for record, prediction in zip(records, predictions, strict=True)]
    labels = predictor.settings.label_names
    unlabelled = sum(prediction.strip() not in labels for prediction in predictions) if labels else 0
    if unlabelled:  # "" or a fragment: the adapter generates, it does not choose (an undertrained one, say)
        print(f"ia3-trainer: {unlabelled} of {len(predictions)} predictions are none of the adapter's labels "
              f"{labels}; train longer, or check that the texts look like its training data", file=sys.stderr)
    if args.output:
        write_text(args.output, "".join(line + "\n" for line in lines))
        print(f"{len(lines)} predictions written to {args.output}")
    else:
        print("\n".join(lines))
    return 0


def announce_remote_code(args) -> None:
    """The line `--trust-remote-code` prints before a model loads: whose code may run."""
    if args.trust_remote_code:
        print(f"ia3-trainer: --trust-remote-code is on: code shipped with {args.adapter}'s base model or tokenizer "
              "may run", file=sys.stderr)


def load_predictor(args):
    """The predictor of `predict`/`evaluate`: the adapter, with a model's own code allowed only by the flag."""
    from .predictor import IA3Predictor

    announce_remote_code(args)
    return IA3Predictor.from_pretrained(args.adapter, revision=args.revision, trust_remote_code=args.trust_remote_code)


def _check_output_file(path: str, overwrite: bool = False) -> None:
    """`path` can be written: its folder exists and takes files, it is not itself a folder, and it is new unless
    `overwrite`."""
    file = Path(path)
    if file.is_dir():
        raise PathError(f"--output: {path} is a folder; name a file, e.g. {file / 'predictions.jsonl'}")
    if file.exists() and not overwrite:
        raise PathError(f"--output: {path} exists; choose another file or pass --overwrite to replace it")
    if not file.parent.is_dir():
        raise PathError(f"--output: no folder {file.parent} to write {file.name} in; create it first")
    if not os.access(file.parent, os.W_OK):
        raise PathError(f"--output: cannot write in {file.parent}")


def _read_text_file(path: str) -> list:
    file = Path(path)
    if file.is_dir():
        raise PathError(f"--file: {path} is a folder; name one file of texts")
    if not file.is_file():
        raise PathError(f"--file: no such file {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"--file: {path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from error
    lines = [line for line in text.splitlines() if line.strip()]
    if file.suffix not in (".jsonl", ".json"):
        return lines
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
            reason = getattr(error, "msg", None) or first_line(error)
            message = f"{path}: line {number}: not JSON ({reason}); write one JSON object per line"
            raise InputError(message) from error
    return rows


def evaluate(args) -> int:
    """`ia3-trainer evaluate`: score the adapter on its recipe's validation split or --data; write the report."""
    from .data import data_file_format, label_texts, load_splits, target_length_bound, tokenize
    from .report import build_report, read_log_history, summary_text, write_report
    from .starter import check_encoding, not_utf8_option

    file_format = data_file_format(args.data, "--data") if args.data else None  # a bad --data: before the model loads
    if args.encoding:
        check_encoding(args.encoding)
    _check_counts(args)
    local = Path(args.adapter).is_dir()
    output_dir = args.output_dir or (args.adapter if local else ".")
    # The adapter folder's own report (of its validation split, as train writes it) is replaced by the same one.
    own = local and not args.data and Path(output_dir).resolve() == Path(args.adapter).resolve()
    _check_report_folder(output_dir, args.output_dir is None, args.overwrite or own)
    # Reads the adapter folder (a Hub repo's download) and its recipe.json, validated, before the model loads: so
    # does a bad recipe.json fail. Its data section says which data to read, never unchecked load_dataset keywords.
    predictor = load_predictor(args)
    data = predictor.settings.data
    if args.data:
        data, described = _file_data(args.data, file_format, data, args.encoding), args.data
    elif data is None:
        raise InputError(f"{args.adapter}: has no recipe.json to say which data to evaluate on; pass --data FILE")
    elif data.validation_split is None and not data.validation_size:
        raise InputError(f"{args.adapter}: its recipe has no validation data (data.validation_size is 0); pass "
                         "--data FILE")
    else:
        described = f"validation split of the recipe in {args.adapter}"
    try:
        train, validation = load_splits(data)
    except RecipeError as error:  # in the options' terms: evaluate takes no data.load_kwargs
        undecodable = error.__cause__ and error.__cause__.__cause__
        if args.data and isinstance(undecodable, UnicodeDecodeError):
            raise InputError(not_utf8_option(Path(args.data), undecodable)) from error
        raise
    train, validation, names = label_texts(train, validation, data)
    target_length_bound(predictor.tokenizer, [validation], data, names)
    outputs = predictor.score(tokenize(validation, predictor.tokenizer, data), batch_size=args.batch_size)
    names = predictor.settings.label_names or names
    report = build_report(outputs, predictor.tokenizer, names, adapter=str(args.adapter), data=described)
    paths = write_report(report, output_dir, read_log_history(predictor.settings.folder))
    print(summary_text(report, paths))
    return 0


def _check_report_folder(path: str, default: bool, overwrite: bool) -> None:
    """The report can go to the folder `path`: it is no file, holds no report file (an earlier report, or a file of
    that name) unless `overwrite`, and can be written. Other files in it are left as they are."""
    from .layout import REPORT_FILES

    folder = Path(path)
    where = f"{path} (where the report goes without --output-dir)" if default else path
    if folder.exists() and not folder.is_dir():
        raise PathError(f"--output-dir: {where} is a file; name a folder for the report")
    present = [name for name in REPORT_FILES if (folder / name).exists()]
    if present and not overwrite:
        raise PathError(f"--output-dir: {where} holds {', '.join(present)} already; pass --overwrite to replace "
                        "them, or choose another --output-dir")
    existing = next(parent for parent in (folder.absolute(), *folder.absolute().parents) if parent.exists())
    if not os.access(existing, os.W_OK):  # checked before the model loads, not found when the report is written
        raise PathError(f"--output-dir: cannot write in {existing}; choose another --output-dir")


def _file_data(path: str, file_format: tuple[str, dict], data, encoding: str | None = None):
    """The recipe's data section, reading `path` (`data_file_format`'s `(builder, load_kwargs)`) as the evaluation set
    (defaults when there is no recipe), in `encoding` or the recipe's own one."""
    import dataclasses

    from .recipe import DataSection

    builder, own = file_format
    data = data or DataSection(path=builder)
    load_kwargs = own or (data.load_kwargs if builder == data.path else {})
    encoding = encoding or data.load_kwargs.get("encoding")
    if encoding and builder in ("csv", "json", "text"):
        load_kwargs = {**load_kwargs, "encoding": encoding}
    # A `text<sep>label` separator describes .txt lines; a csv or json file has its own text and label columns.
    separator = data.label_separator if builder == "text" else None
    # The whole file is the evaluation set: it is both splits, so nothing is held out or cut.
    return dataclasses.replace(
        data, path=builder, name=None, data_files={"train": str(path)}, load_kwargs=load_kwargs, train_split="train",
        validation_split="train", max_train_samples=None, max_eval_samples=None, label_separator=separator,
    )
