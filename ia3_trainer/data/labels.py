"""Labels: the label texts and the label set, and the generation bound taken from the longest label; every problem
names the `data.*` field to change.
"""

from __future__ import annotations

import logging

from ia3_trainer.errors import DataError
from ia3_trainer.recipe.loading import DataSection


logger = logging.getLogger("ia3_trainer.data")


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


def target_length_bound(tokenizer, datasets_, data: DataSection, names: list[str] | None) -> int:
    """The generation bound for these splits' targets: class labels must fit `max_target_length` (a truncated
    label is another class), free-text targets are truncated to it with a logged count."""
    texts = sorted({str(label) for dataset in datasets_ if dataset is not None
                    for label in dataset.unique(data.label_column)})
    if names is None:
        return truncated_target_lengths(tokenizer, texts, data.max_target_length)
    return check_label_lengths(tokenizer, texts, data.max_target_length)


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
