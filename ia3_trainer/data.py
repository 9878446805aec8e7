"""Load the recipe's splits, check columns and labels, tokenize, and build the padding collator.

Every problem found here is a [`DataError`] (a `RecipeError`) naming the `data.*` field to change, raised before
training starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, InputError, PathError, shorten
from .recipe import DataSection
from .sections import MAX_TOKENS
from .sources import not_utf8, read_dataset


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label id the collator pads with, and that token losses and metrics skip


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


@dataclass
class PreparedData:
    """Tokenized splits ready for the trainer, plus what evaluation needs to know about the labels."""

    train_dataset: object
    eval_dataset: object | None
    label_names: list[str] | None
    max_label_tokens: int


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


def label_texts(train, validation, data: DataSection):
    """Map labels to text. Returns `(train, validation, label_names)`; `label_names` is None for free-text targets.

    Integer labels become text through the dataset's ClassLabel names or `data.label_names`; text labels are
    used as they are and, when `data.label_names` is given, must be among them.
    """
    import datasets

    feature = train.features[data.label_column]
    names = data.label_names
    if isinstance(feature, datasets.ClassLabel):
        names = names or feature.names
        if len(names) != feature.num_classes:
            raise DataError(
                f"data.label_names: has {len(names)} names but the dataset's ClassLabel has {feature.num_classes}"
            )
    is_int = getattr(feature, "dtype", "").startswith(("int", "uint")) or isinstance(feature, datasets.ClassLabel)
    if is_int and names is None:
        raise DataError(
            f"data.label_names: labels in column {data.label_column!r} are integers and the dataset has no "
            "ClassLabel names; set data.label_names to the text of each label, e.g. [\"negative\", \"neutral\", "
            "\"positive\"]"
        )

    def to_text(dataset, split):
        if dataset is None:
            return None
        if is_int:
            values = set(dataset.unique(data.label_column))
            outside = sorted(v for v in values if not 0 <= v < len(names))
            if outside:
                raise DataError(
                    f"data.label_names: split {split!r} has label ids {outside[:5]} but only {len(names)} names"
                )
            column = data.label_column
            return dataset.map(lambda batch: {column: [names[v] for v in batch[column]]}, batched=True,
                               features=_text_features(dataset, column), desc="Label ids to text")
        values = set(dataset.unique(data.label_column))
        if names is not None:
            outside = sorted(str(v) for v in values - set(names))
            if outside:
                raise DataError(
                    f"data.label_names: split {split!r} has labels {outside[:5]} that are not in {names}; "
                    "add them to data.label_names or fix the data"
                )
        return dataset

    train = to_text(train, data.train_split)
    validation = to_text(validation, data.validation_split or "validation")
    if names is None and is_classification(train, data):
        seen = set(train.unique(data.label_column)) | set(validation.unique(data.label_column) if validation else [])
        names = sorted(seen)
    if names is not None and validation is not None:
        unseen = sorted(set(validation.unique(data.label_column)) - set(train.unique(data.label_column)))
        if unseen:
            logger.warning("The validation split has labels the training split never has: %s", unseen)
    return train, validation, None if names is None else list(names)


def is_classification(dataset, data: DataSection, max_classes: int = 50) -> bool:
    """Text labels drawn from a small set are classes (label accuracy, rank classification apply)."""
    return len(dataset.unique(data.label_column)) <= min(max_classes, max(2, len(dataset) // 2))


def check_label_lengths(tokenizer, texts, max_target_length: int) -> int:
    """Fail when a label would be truncated; return the longest label's token count (with EOS)."""
    longest = 0
    for text in sorted(set(texts)):
        ids = tokenizer(text_target=text)["input_ids"]
        if len(ids) > max_target_length:
            raise DataError(
                f"data.max_target_length: label {text[:60]!r} is {len(ids)} tokens (with end-of-sequence) but "
                f"data.max_target_length is {max_target_length}; raise it to at least {len(ids)}"
            )
        longest = max(longest, len(ids))
    return longest


def check_distinct_labels(tokenizer, names: list[str], data: DataSection) -> None:
    """Refuse a label set in which two labels are one label to the model (`"positive"` and `"positive "`, or texts
    the tokenizer maps to the same ids) or a label comes back empty from the tokenizer: scoring compares labels as
    they decode, so such labels would be separate classes that can never be told apart."""
    where = "data.label_names" if data.label_names is not None else f"data.label_column: column {data.label_column!r}"
    ids = tokenizer(text_target=[str(name) for name in names])["input_ids"]
    texts = [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    empty = [name for name, text in zip(names, texts, strict=True) if not text]
    if empty:
        raise DataError(
            f"{where}: labels {shorten(repr(empty[:5]), 200)} decode to an empty text with this tokenizer (no "
            "token it knows), so no prediction can match them; rename them in the data or data.label_names"
        )
    same: dict[str, list[str]] = {}
    for name, text in zip(names, texts, strict=True):
        same.setdefault(text, []).append(name)
    clashes = [group for group in same.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(f"{shorten(repr(group[:5]), 120)} all read {texts[names.index(group[0])]!r}"
                          for group in clashes[:3])
        raise DataError(
            f"{where}: labels that differ as text are one label to the model ({shown}, once tokenized); merge or "
            "rename them in the data or data.label_names"
        )


def encode_batch(batch: dict, tokenizer, data: DataSection) -> dict:
    """Turn a batch of examples into model inputs: prefixed sources truncated to `max_source_length`, and labels when
    the batch has the label column. Training, evaluation and inference (`IA3Predictor`) all encode through this (or
    through a trainer's overridden `preprocess`)."""
    sources = [data.source_prefix + str(text) for text in batch[data.text_column]]
    model_inputs = tokenizer(sources, max_length=data.max_source_length, truncation=True)
    if data.label_column in batch:
        targets = tokenizer(text_target=[str(label) for label in batch[data.label_column]],
                            max_length=data.max_target_length, truncation=True)
        model_inputs["labels"] = targets["input_ids"]
    return model_inputs


def truncated_target_lengths(tokenizer, texts, max_target_length: int) -> int:
    """Log how many free-text targets exceed `max_target_length`; return the longest length after truncation."""
    lengths = [len(ids) for ids in tokenizer(text_target=list(texts))["input_ids"]]
    over = sum(length > max_target_length for length in lengths)
    if over:
        logger.warning(
            "%d of %d distinct targets are longer than data.max_target_length=%d tokens and are truncated "
            "(longest: %d); raise data.max_target_length to keep them whole", over, len(lengths), max_target_length,
            max(lengths),
        )
    return min(max(lengths, default=0), max_target_length)


def tokenize(dataset, tokenizer, data: DataSection, encode=None):
    """Map `encode` (defaults to [`encode_batch`]) over batches of `dataset`; keep only the model inputs it returns."""
    if dataset is None:
        return None
    encode = encode or encode_batch
    return dataset.map(lambda batch: encode(batch, tokenizer, data), batched=True,
                       remove_columns=dataset.column_names, desc="Tokenizing")


def target_length_bound(tokenizer, datasets_, data: DataSection, names: list[str] | None) -> int:
    """The generation bound for these splits' targets: class labels must fit `max_target_length` (a truncated
    label is another class), free-text targets are truncated to it with a logged count."""
    texts = sorted({str(label) for dataset in datasets_ if dataset is not None
                    for label in dataset.unique(data.label_column)})
    if names is None:
        return truncated_target_lengths(tokenizer, texts, data.max_target_length)
    return check_label_lengths(tokenizer, texts, data.max_target_length)


def prepare_data(data: DataSection, tokenizer, encode=None) -> PreparedData:
    """Load, check and tokenize the recipe's data: the whole path from `data` section to trainer datasets.

    Classification labels (a known label set) must fit `max_target_length`, or it is an error: a truncated label
    is a different class. Free-text targets (summaries, translations) are truncated, with a logged count.
    """
    train, validation = load_splits(data)
    train, validation, names = label_texts(train, validation, data)
    if names is not None:
        check_distinct_labels(tokenizer, names, data)
    longest = target_length_bound(tokenizer, [train, validation], data, names)
    warn_shared_texts(train, validation, data)
    prepared = PreparedData(
        train_dataset=tokenize(train, tokenizer, data, encode),
        eval_dataset=tokenize(validation, tokenizer, data, encode),
        label_names=names,
        max_label_tokens=longest,
    )
    warn_truncated_sources({"training": (train, prepared.train_dataset), "validation": (validation,
                            prepared.eval_dataset)}, tokenizer, data, encode)
    return prepared


def warn_shared_texts(train, validation, data: DataSection) -> int:
    """Log how many validation examples have a text the training split has too (they inflate validation scores);
    return that count."""
    if validation is None:
        return 0
    seen = set(train[data.text_column])
    shared = [text for text in validation[data.text_column] if text in seen]
    if shared:
        logger.warning(
            "%d of %d validation examples have the same text as a training example (e.g. %r): their scores say how "
            "well the adapter remembers, not how it does on new text; remove the duplicates from the data",
            len(shared), len(validation), shorten(str(shared[0]), 60),
        )
    return len(shared)


def warn_truncated_sources(splits: dict, tokenizer, data: DataSection, encode=None) -> dict[str, int]:
    """Log once how many sources of each split (`{name: (examples, tokenized)}`) were cut at
    `data.max_source_length` (see [`cut_sources`]); return the counts."""
    counts, totals = {}, {}
    for name, (examples, tokenized) in splits.items():
        if tokenized is None:
            continue
        ids = tokenized["input_ids"]
        counts[name], totals[name] = len(cut_sources(examples, ids, tokenizer, data, encode)), len(ids)
    said = [f"{counts[name]} of {totals[name]} {name}" for name in counts if counts[name]]
    if said:
        logger.warning(
            "%s sources are longer than data.max_source_length=%d tokens and were truncated (the model sees only "
            "their start); raise data.max_source_length to keep them whole", " and ".join(said),
            data.max_source_length,
        )
    return counts


def cut_sources(examples, ids: list[list[int]], tokenizer, data: DataSection, encode=None) -> list[int]:
    """Positions of the `examples` (a `datasets.Dataset`, or a batch `{column: values}`) whose encoding `ids` was cut
    at `data.max_source_length`. A source that encodes to exactly the limit is encoded again without it, through
    the same `encode` (defaults to [`encode_batch`]), to tell a cut source from one that just fits."""
    import dataclasses

    at_limit = [i for i, row_ids in enumerate(ids) if len(row_ids) >= data.max_source_length]
    if not at_limit:
        return []
    if isinstance(examples, dict):
        rows = {column: [values[i] for i in at_limit] for column, values in examples.items()}
    else:
        rows = examples.select(at_limit)[:]
    unlimited = dataclasses.replace(data, max_source_length=MAX_TOKENS)  # the largest the section takes
    full = (encode or encode_batch)(rows, tokenizer, unlimited)["input_ids"]
    return [i for i, row_ids in zip(at_limit, full, strict=True) if len(row_ids) > data.max_source_length]


def build_collator(tokenizer, model=None, pad_to_multiple_of: int | None = 8):
    """Dynamic padding to the longest sequence of each batch (rounded up for tensor cores); labels padded with
    `IGNORE_INDEX`."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of
    )


def _text_features(dataset, column: str):
    import datasets

    features = dataset.features.copy()
    features[column] = datasets.Value("string")
    return features


def longest_labels(dataset) -> int | None:
    """The token count of the longest label in a tokenized dataset (its generation bound), or None: also for a
    dataset without known columns, and for an `IterableDataset` (a stream is not read through for a bound)."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset) or "labels" not in (getattr(dataset, "column_names", None) or ()):
        return None
    return max(map(len, dataset["labels"]), default=None)  # no map: no progress bar at every evaluation
