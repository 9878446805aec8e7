"""Metric functions: pure numpy, no model, so they are easy to test and to reuse outside the trainer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


IGNORE_INDEX = -100


def perplexity(nll_sum: float, token_count: float = 1.0) -> float:
    """`exp` of the mean token negative log-likelihood (`perplexity(mean_loss)` for a mean already taken);
    `inf` when it overflows, `nan` with no tokens."""
    if token_count <= 0:
        return float("nan")
    try:
        return math.exp(nll_sum / token_count)
    except OverflowError:
        return float("inf")


def label_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of generated texts that equal the gold label text once surrounding whitespace is stripped."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def decode(token_ids: np.ndarray, tokenizer) -> list[str]:
    """Decode a batch padded with -100 (the eval loop's padding) into stripped texts."""
    ids = np.where(np.asarray(token_ids) == IGNORE_INDEX, tokenizer.pad_token_id, token_ids)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def build_compute_metrics(tokenizer) -> Callable:
    """`compute_metrics` for [`IA3Seq2SeqTrainer`]: label accuracy from generated ids, perplexity from token NLL.

    The trainer's `prediction_step` returns `(generated_ids, nll_sum_per_example, tokens_per_example)` as
    predictions, so perplexity is the exact per-token mean over the whole eval set (not a mean of batch means)
    and no logits are kept.
    """

    def compute_metrics(eval_prediction) -> dict[str, float]:
        generated, nll_sum, token_count = eval_prediction.predictions
        metrics = {"perplexity": perplexity(float(np.sum(nll_sum)), float(np.sum(token_count)))}
        if eval_prediction.label_ids is not None:
            metrics["label_accuracy"] = label_accuracy(
                decode(generated, tokenizer), decode(eval_prediction.label_ids, tokenizer)
            )
        return metrics

    return compute_metrics
