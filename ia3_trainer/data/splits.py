"""The recipe's splits: reading its data (a local file of any supported format, or a Hub dataset), holding out the
validation split, and checking the columns.
"""

from __future__ import annotations

from pathlib import Path

from ia3_trainer.data.sources import not_utf8, read_dataset
from ia3_trainer.errors import DataError, InputError, PathError, shorten
from ia3_trainer.recipe.loading import DataSection


# The `datasets` builder and load_dataset keywords that read a local file, by suffix (init, evaluate --data); a .txt
# file holds one `text<SEP>label` line per example (`data.label_separator`).
FILE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}


def data_file_format(path: str | Path, option: str = "data_file") -> tuple[str, dict]:
    """`(builder, load_kwargs)` that read the local data file `path`, by its suffix in any case (`FILE_FORMATS`); a
    folder or a missing file is a [`PathError`], another suffix an [`InputError`], each naming `option` (the
    argument that gave `path`) as its key."""
    file = Path(path)
    if file.is_dir():
        raise PathError(key=option, problem=f"{path} is a folder", fix="name one data file in it")
    if not file.is_file():
        raise PathError(key=option, problem=f"no such file {str(path)!r}")
    if file.suffix.lower() not in FILE_FORMATS:
        raise InputError(key=option, problem=f"{file.name}: cannot read {file.suffix or 'extension-less'} files",
                         fix=f"use a {', '.join(FILE_FORMATS)} file")
    builder, load_kwargs = FILE_FORMATS[file.suffix.lower()]
    return builder, dict(load_kwargs)


def load_splits(data: DataSection):
    """Return `(train, validation_or_None)` as `datasets.Dataset`s with text `text_column` and `label_column`."""
    try:
        return _load_splits(data)
    except UnicodeDecodeError as error:  # json files are decoded only when a column is read (check_columns)
        raise DataError(not_utf8(data, error)) from error


def _load_splits(data: DataSection):
    import datasets

    loaded = read_dataset(data)
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({data.train_split: loaded})
    available = sorted(loaded)
    for key in ("train_split", "validation_split"):
        split = getattr(data, key)
        if split is not None and split not in loaded:
            raise DataError(f"data.{key}: no split {split!r}; the dataset has {available}")
    train = loaded[data.train_split]
    validation = loaded[data.validation_split] if data.validation_split is not None else None

    if data.label_separator is not None:
        train = split_lines(train, data, data.train_split)
        validation = split_lines(validation, data, data.validation_split) if validation is not None else None
    # A nested field is named with dots (`translation.en` in opus_books and wmt16): flatten() makes such columns.
    if any("." in column and column not in train.column_names for column in (data.text_column, data.label_column)):
        train = train.flatten()
        validation = validation.flatten() if validation is not None else None

    for key, dataset in (("train_split", train), ("validation_split", validation)):
        if dataset is not None and len(dataset) == 0:
            raise DataError(f"data.{key}: split {getattr(data, key)!r} is empty; check data.data_files")
    check_columns(train, data, data.train_split)
    if validation is None and data.validation_size:
        if len(train) < 2:
            raise DataError(f"data.train_split: split {data.train_split!r} has {len(train)} example(s); need >= 2")
        if isinstance(data.validation_size, int) and data.validation_size >= len(train):
            raise DataError(
                f"data.validation_size: {data.validation_size} examples held out of {len(train)} in split "
                f"{data.train_split!r} leaves none to train on; give a smaller count or a fraction such as 0.1"
            )
        parts = train.train_test_split(test_size=data.validation_size, seed=data.split_seed)
        train, validation = parts["train"], parts["test"]
    if validation is not None:
        check_columns(validation, data, data.validation_split or data.train_split)
    if data.max_train_samples is not None:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if validation is not None and data.max_eval_samples is not None:
        validation = validation.select(range(min(data.max_eval_samples, len(validation))))
    return train, validation


def split_lines(dataset, data: DataSection, split: str):
    """Turn one-column `text<sep>label` lines into `text_column` and `label_column`, splitting on the last `sep`."""
    column = dataset.column_names[0] if len(dataset.column_names) == 1 else None
    if column is None:
        raise DataError(
            f"data.label_separator: split {split!r} has columns {dataset.column_names}; a separator needs "
            "one text column (e.g. data.path 'text'); remove data.label_separator"
        )
    sep = data.label_separator
    dataset = dataset.filter(lambda row: bool(row[column].strip()))
    bad = dataset.filter(lambda batch: [sep not in line for line in batch[column]], batched=True)
    if len(bad):
        raise DataError(
            f"data.label_separator: {len(bad)} line(s) of split {split!r} have no {sep!r}, "
            f"e.g. {bad[0][column][:80]!r}"
        )

    def split_batch(batch):
        pairs = [line.rsplit(sep, 1) for line in batch[column]]
        return {data.text_column: [p[0].strip() for p in pairs], data.label_column: [p[1].strip() for p in pairs]}

    return dataset.map(split_batch, batched=True, remove_columns=[column], desc="Splitting lines")


def check_columns(dataset, data: DataSection, split: str) -> None:
    """Both columns exist, hold one value a row (a text, or an integer label), and every row has a value in them (an
    empty cell would train on the text "None")."""
    import datasets

    for key in ("text_column", "label_column"):
        column = getattr(data, key)
        if column not in dataset.column_names:
            raise DataError(
                f"data.{key}: no column {column!r} in split {split!r}; its columns are {dataset.column_names}; "
                f"set data.{key} to one of them"
            )
        feature = dataset.features[column]
        if not isinstance(feature, (datasets.Value, datasets.ClassLabel)):
            # Json: values of mixed types (1 and "positive"); List: a list per row. Arrow cannot compare either.
            what = "values of mixed types" if type(feature).__name__ == "Json" else f"{type(feature).__name__} values"
            example = next((value for value in dataset[column] if value is not None), None)
            raise DataError(
                f"data.{key}: column {column!r} of split {split!r} holds {what} (e.g. {shorten(repr(example), 60)}); "
                "each row needs one text" + (" or one integer label" if key == "label_column" else "")
            )
        empty = dataset.select_columns([column]).filter(
            lambda batch, column=column: [v is None or (isinstance(v, str) and not v.strip()) for v in batch[column]],
            batched=True, desc=f"Checking {column}",
        )
        if len(empty):
            raise DataError(
                f"data.{key}: {len(empty)} row(s) of split {split!r} have no value in column {column!r}; drop or "
                "fill them in the data"
            )
