"""`prepare_data`: the recipe's data made ready to train on (splits, labels, tokens), with warnings about texts
shared by both splits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ia3_trainer.data.encoding import tokenize, warn_truncated_sources
from ia3_trainer.data.labels import label_texts, target_length_bound
from ia3_trainer.data.splits import load_splits
from ia3_trainer.errors import DataError, shorten
from ia3_trainer.recipe.loading import DataSection


logger = logging.getLogger("ia3_trainer.data")


@dataclass
class PreparedData:
    """Tokenized splits ready for the trainer, plus what evaluation needs to know about the labels."""

    train_dataset: object
    eval_dataset: object | None
    label_names: list[str] | None
    max_label_tokens: int


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
