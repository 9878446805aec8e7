"""Metric functions against hand-computed values."""

import math

import numpy as np
import pytest

from ia3_trainer.evaluation.metrics import decode, eval_metrics, label_accuracy, perplexity
from ia3_trainer.modeling.scoring import EvalOutputs


def test_perplexity_is_exp_of_token_mean():
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == float("inf")
    assert math.isnan(perplexity(1.0, 0))


def test_label_accuracy_strips_whitespace():
    assert label_accuracy([" positive", "neutral ", "negative"], ["positive", "neutral", "positive"]) == 2 / 3
    assert math.isnan(label_accuracy([], []))
    with pytest.raises(ValueError, match="got 1 predictions for 2 references"):
        label_accuracy(["a"], ["a", "b"])


def test_decode_masks_minus_100(tokenizer):
    ids = tokenizer(text_target=["positive", "neutral"], padding=True)["input_ids"]
    batch = np.array([ids[0] + [-100, -100], ids[1] + [-100, -100]])
    assert decode(batch, tokenizer) == ["positive", "neutral"]


def test_compute_metrics_weights_perplexity_by_tokens(tokenizer):
    gold = tokenizer(text_target=["positive", "neutral", "negative"])["input_ids"]
    labels = np.array(gold)
    generated = np.array([[0] + gold[0], [0] + gold[1], [0] + gold[0]])  # decoder start, then text
    nll_sum = np.array([1.0, 2.0, 6.0])
    tokens = np.array([1, 2, 3])
    rank_choice = np.array([2, 1, 1])  # indexes into the candidate list below
    outputs = EvalOutputs(labels=labels, generated=generated, nll_sum=nll_sum, token_count=tokens,
                          rank_choice=rank_choice)
    names = ["perplexity", "label_accuracy", "rank_accuracy"]
    metrics = eval_metrics(outputs, names, tokenizer, ["negative", "neutral", "positive"])
    assert metrics["label_accuracy"] == pytest.approx(2 / 3)
    assert metrics["rank_accuracy"] == pytest.approx(2 / 3)  # positive, neutral right; neutral for negative wrong
    # 9 nats over 6 tokens, not the mean of per-example means (which would be exp(5/3))
    assert metrics["perplexity"] == pytest.approx(math.exp(1.5))
    assert outputs.loss == pytest.approx(1.5)
    without_labels = eval_metrics(EvalOutputs(generated=generated, nll_sum=nll_sum, token_count=tokens), names,
                                  tokenizer)
    assert set(without_labels) == {"perplexity"}


def test_rank_accuracy_compares_candidates_as_the_tokenizer_decodes_them(tokenizer):
    # "positive " comes back from the tokenizer as "positive": the candidate must match that reference.
    gold = tokenizer(text_target=["positive"])["input_ids"]
    outputs = EvalOutputs(labels=np.array(gold), rank_choice=np.array([0]))
    assert eval_metrics(outputs, ["rank_accuracy"], tokenizer, ["positive ", "negative"]) == {"rank_accuracy": 1.0}


def test_on_decoded_gives_a_function_the_texts_of_both_sides(tokenizer):
    from transformers import EvalPrediction

    from ia3_trainer.evaluation.metrics import on_decoded

    seen = []

    def lengths(predictions, references):
        seen.append((list(predictions), list(references)))
        return {"same": sum(p == r for p, r in zip(predictions, references, strict=True))}

    generated = tokenizer(text_target=["positive", "neutral"], padding=True)["input_ids"]
    gold = tokenizer(text_target=["positive", "negative"])["input_ids"]
    width = max(map(len, gold))
    labels = np.array([ids + [-100] * (width - len(ids)) for ids in gold])  # the eval loop pads labels with -100
    compute_metrics = on_decoded(tokenizer, lengths)
    assert compute_metrics(EvalPrediction(predictions=np.array(generated), label_ids=labels)) == {"same": 1}
    assert seen == [(["positive", "neutral"], ["positive", "negative"])]
    assert compute_metrics(EvalPrediction(predictions=np.array(generated), label_ids=None)) == {}
    assert len(seen) == 1  # nothing to compare with: the function is not called


def test_a_metric_added_to_the_registry_is_validated_and_computed(tokenizer, monkeypatch):
    from ia3_trainer import RecipeError
    from ia3_trainer.evaluation import metrics
    from ia3_trainer.recipe import sections

    with pytest.raises(RecipeError, match="unknown metric 'first_word'"):
        sections.EvalSection(metrics=["first_word"])
    # One entry in sections.METRICS, and its function in ia3_trainer.evaluation.metrics under the same name.
    monkeypatch.setitem(sections.METRICS, "first_word", sections.Metric("share of texts whose first word is right"))
    monkeypatch.setattr(metrics, "first_word", lambda predictions, references: {"first_word": sum(
        p.split()[:1] == r.split()[:1] for p, r in zip(predictions, references, strict=True)) / len(references)},
        raising=False)
    assert sections.EvalSection(metrics=["first_word"]).metrics == ["first_word"]
    assert metrics.needs_generation(["first_word"]) and not metrics.needs_generation(["perplexity"])
    gold = tokenizer(text_target=["positive", "neutral"])["input_ids"]
    generated = np.array([[0] + gold[0], [0] + gold[0]])
    outputs = EvalOutputs(labels=np.array(gold), generated=generated)
    assert eval_metrics(outputs, ["first_word"], tokenizer) == {"first_word": 0.5}
    with pytest.raises(RecipeError, match="unknown text metric 'perplexity'"):  # not scored from text
        metrics.text_metric("perplexity")
