"""`ia3-trainer evaluate`: score an adapter on its recipe's validation split or a file, and write the report."""

from __future__ import annotations

import os
from pathlib import Path

from ia3_trainer.cli.adapters import check_counts, load_predictor
from ia3_trainer.errors import InputError, PathError, RecipeError


def evaluate_command(args) -> int:
    """`ia3-trainer evaluate`: score the adapter on its recipe's validation split or --data; write the report."""
    from ia3_trainer.data.encoding import tokenize
    from ia3_trainer.data.labels import label_texts, target_length_bound
    from ia3_trainer.data.splits import data_file_format, load_splits
    from ia3_trainer.data.starter import check_encoding, not_utf8_option
    from ia3_trainer.evaluation.report import build_report, read_log_history, summary_text, write_report

    file_format = data_file_format(args.data, "--data") if args.data else None  # a bad --data: before the model loads
    if args.encoding:
        check_encoding(args.encoding)
    check_counts(args)
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
    from ia3_trainer.layout import REPORT_FILES

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

    from ia3_trainer.recipe.loading import DataSection

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
