"""Metric functions: pure numpy, no model, so they are easy to test and to reuse outside the trainer."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from ia3_trainer.data.encoding import IGNORE_INDEX
from ia3_trainer.errors import MissingPackageError, RecipeError
from ia3_trainer.recipe.sections import DEFAULT_METRICS as DEFAULT_METRICS
from ia3_trainer.recipe.sections import METRICS


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
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)


def decode_texts(texts: Sequence[str], tokenizer) -> list[str]:
    """Texts as they come back from encoding them as targets and decoding: how references look to the metrics."""
    encoded = tokenizer(text_target=list(texts))["input_ids"]
    return [text.strip() for text in tokenizer.batch_decode(encoded, skip_special_tokens=True)]


def decode(token_ids: np.ndarray, tokenizer) -> list[str]:
    """Decode a batch padded with -100 (the eval loop's padding) into stripped texts."""
    ids = np.where(np.asarray(token_ids) == IGNORE_INDEX, tokenizer.pad_token_id, token_ids)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _reads(name: str) -> str:
    """What evaluation computes for metric `name` (`METRICS`); a name not there would be a text metric."""
    return METRICS[name].reads if name in METRICS else "text"


def needs_generation(metrics: Sequence[str]) -> bool:
    """Whether any of `metrics` compares generated text (so evaluation must call `generate`)."""
    return any(_reads(name) in ("generation", "text") for name in metrics)


def check_metrics(metrics: Sequence[str]) -> None:
    """Raise [`MissingPackageError`] (an `ImportError`) naming the pip command when a text metric's package is missing
    (before a model loads)."""
    for name in metrics:
        if _reads(name) == "text":
            text_metric(name)


def eval_metrics(
    outputs, metrics: Sequence[str], tokenizer, candidate_labels: Sequence[str] | None = None
) -> dict[str, float]:
    """The `metrics` (names of `METRICS`) of one evaluation pass, from its per-example outputs.

    `outputs` is a [`~ia3_trainer.modeling.scoring.EvalOutputs`]: `nll_sum` and `token_count` (perplexity is the exact
    token mean over the whole eval set, not a mean of batch means), `generated` ids (decoded once and shared by every
    text metric), `rank_choice` (index into `candidate_labels` of the most likely label) and the reference `labels`.
    A metric whose inputs were not computed is left out.
    """
    result = {}
    if "perplexity" in metrics and outputs.nll_sum is not None:
        result["perplexity"] = perplexity(outputs.loss)
    if outputs.labels is None:
        return result
    references = decode(outputs.labels, tokenizer)
    if outputs.generated is not None and needs_generation(metrics):
        generated = decode(outputs.generated, tokenizer)
        if "label_accuracy" in metrics:
            result["label_accuracy"] = label_accuracy(generated, references)
        for name in metrics:
            if _reads(name) == "text":
                result.update(text_metric(name)(generated, references))
    if "rank_accuracy" in metrics and outputs.rank_choice is not None and candidate_labels:
        # Compared as the tokenizer decodes them ("Positive!" may come back as "Positive"), as references are.
        candidate_texts = decode_texts(candidate_labels, tokenizer)
        chosen = [candidate_texts[i] for i in np.asarray(outputs.rank_choice).tolist()]
        result["rank_accuracy"] = label_accuracy(chosen, references)
    return result


def on_decoded(tokenizer, function: Callable[[Sequence[str], Sequence[str]], dict[str, float]]) -> Callable:
    """A Trainer `compute_metrics` that decodes the generated ids and the labels of an `EvalPrediction` and returns
    `function(predictions, references)`, e.g. `on_decoded(tokenizer, evaluate_metric("meteor"))`."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        if eval_prediction.label_ids is None:
            return {}
        return function(decode(eval_prediction.predictions, tokenizer), decode(eval_prediction.label_ids, tokenizer))

    return compute_metrics


def text_metric(name: str) -> Callable[[Sequence[str], Sequence[str]], dict[str, float]]:
    """The `(predictions, references) -> {key: value}` function of a text metric name.

    `evaluate.load` fetches its metric scripts from the Hub, so it fails offline; `rouge`, `sacrebleu` and `chrf`
    therefore call their packages directly (same keys and scale as `evaluate`). Any other `evaluate` metric is
    [`evaluate_metric`], for code (a trainer subclass), never for recipes: loading it runs a script.
    """
    if _reads(name) != "text" or name not in METRICS:
        raise RecipeError(key="eval.metrics", problem=f"unknown text metric {name!r}",
                          fix=f"use one of {', '.join(key for key in METRICS if _reads(key) == 'text')}")
    _require(name)
    return globals()[name]  # each text metric of METRICS is the function of its name, below


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 (no stemming), the keys and scale of `evaluate`'s rouge.

    rouge_score's own tokenizer keeps only `[a-z0-9]`, so a Russian or Chinese summary scored 0 against any
    reference; here every script counts: words are runs of Unicode letters and digits (lowercased), and scripts
    written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar, Tibetan) count one character per token. On ASCII
    text this is rouge_score's default tokenization.
    """
    _require("rouge")
    from rouge_score import rouge_scorer

    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(keys, tokenizer=_EveryScript())
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {key: float(np.mean([s[key].fmeasure for s in scores])) if scores else float("nan") for key in keys}


# Scripts written without spaces between words: one token per character (as multilingual ROUGE segments Chinese).
_UNSPACED = "\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W_{_UNSPACED}]+")


class _EveryScript:
    """A rouge_score tokenizer (duck-typed: `tokenize(text) -> list[str]`) that keeps every script's words."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def sacrebleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU of `sacrebleu` (default 13a tokenization, one reference per example), in [0, 100]."""
    _require("sacrebleu")
    import sacrebleu as package

    return {"sacrebleu": float(package.corpus_bleu(list(predictions), [list(references)]).score)}


def chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus chrF of `sacrebleu` (character n-gram F-score, robust for morphologically rich targets), in [0, 100]."""
    _require("chrf")
    import sacrebleu as package

    return {"chrf": float(package.corpus_chrf(list(predictions), [list(references)]).score)}


def evaluate_metric(name: str) -> Callable[[Sequence[str], Sequence[str]], dict[str, float]]:
    """Wrap `evaluate.load(name)`; its numeric results are kept under their own keys (`score` becomes the name)."""
    import evaluate

    try:
        module = evaluate.load(name)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as error:
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(
            f"evaluate cannot load {name!r}: {first}; check the name and the network, or give the "
            "path of a local metric script"
        ) from error
    short = name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".py")

    def compute(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        result = module.compute(predictions=list(predictions), references=list(references)) or {}
        return {
            (short if key == "score" else key): float(value)
            for key, value in result.items()
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        }

    return compute


def _require(metric: str) -> None:
    """Raise [`MissingPackageError`] naming the pip command when the package `METRICS[metric]` needs is missing."""
    import importlib.util

    if METRICS[metric].package is None:
        return
    module, package = METRICS[metric].package
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"the {metric} metric needs the {module} package; pip install {package}")


OTHER_LABEL = "(other)"


def confusion_matrix(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """Counts of (reference, prediction) pairs: rows follow `labels`, columns follow `labels` plus, when some
    generated text is no label at all, a last `OTHER_LABEL` column. Texts are compared stripped.

    Returns `(matrix, column_names)`; a reference outside `labels` is a `ValueError` (add it to `labels`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    labels = [label.strip() for label in labels]
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({r.strip() for r in references} - set(index))
    if unknown:
        raise ValueError(f"references {unknown[:5]} are not in labels {labels}")
    other = any(p.strip() not in index for p in predictions)
    columns = labels + [OTHER_LABEL] if other else list(labels)
    matrix = np.zeros((len(labels), len(columns)), dtype=np.int64)
    for prediction, reference in zip(predictions, references, strict=True):
        matrix[index[reference.strip()], index.get(prediction.strip(), len(labels))] += 1
    return matrix, columns


def per_class_scores(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each label from a `confusion_matrix` (rows references, columns
    predictions, an optional last `OTHER_LABEL` column). A ratio with nothing to divide by is 0, as
    scikit-learn's `zero_division=0`, so a class never predicted has precision 0, not `nan`."""
    matrix = np.asarray(matrix)
    scores = {}
    for i, label in enumerate(labels):
        tp, predicted, support = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                         "support": int(support)}
    return scores


def macro_f1(scores: dict[str, dict[str, float]]) -> float:
    """Unweighted mean of the per-class F1 of `per_class_scores` (every label counts, present or not)."""
    return float(np.mean([s["f1"] for s in scores.values()])) if scores else float("nan")
