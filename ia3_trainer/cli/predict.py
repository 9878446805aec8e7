"""`ia3-trainer predict`: label texts with a trained adapter; arguments and files are checked before any model
loads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ia3_trainer.cli.adapters import check_counts, load_predictor
from ia3_trainer.errors import InputError, PathError, first_line
from ia3_trainer.jsonfiles import write_text


def predict_command(args) -> int:
    """`ia3-trainer predict`: one JSON line per text, printed or written whole to --output."""
    from ia3_trainer.inference.predictor import check_texts

    rows = _read_text_file(args.file) if args.file else []
    if not args.texts and not rows:
        raise InputError("predict: no texts; give TEXT arguments or --file FILE")
    check_texts(args.texts)  # before the model loads, which can take minutes
    check_counts(args)
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
