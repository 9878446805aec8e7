"""Encoding examples: the one `encode_batch` used by training and inference, tokenizing a split, counting truncated
sources, and the padding collator.
"""

from __future__ import annotations

import logging

from ia3_trainer.recipe.loading import DataSection
from ia3_trainer.recipe.sections import MAX_TOKENS


logger = logging.getLogger("ia3_trainer.data")


IGNORE_INDEX = -100  # the label id the collator pads with, and that token losses and metrics skip


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


def tokenize(dataset, tokenizer, data: DataSection, encode=None):
    """Map `encode` (defaults to [`encode_batch`]) over batches of `dataset`; keep only the model inputs it returns."""
    if dataset is None:
        return None
    encode = encode or encode_batch
    return dataset.map(lambda batch: encode(batch, tokenizer, data), batched=True,
                       remove_columns=dataset.column_names, desc="Tokenizing")


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
