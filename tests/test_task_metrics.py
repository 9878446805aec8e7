"""Metrics per task: eval.metrics picks them; text metrics share one generation; summaries (ROUGE) and translations
(sacreBLEU, chrF, nested columns) run end to end on the tiny model; free-text targets are truncated, not refused."""

import json
import logging
import math
import sys

import numpy as np
import pytest

from ia3_trainer import IA3Seq2SeqTrainer, RecipeError, load_recipe
from ia3_trainer.data.preparation import prepare_data
from ia3_trainer.evaluation.metrics import (
    check_metrics,
    chrf,
    eval_metrics,
    evaluate_metric,
    needs_generation,
    rouge,
    sacrebleu,
    text_metric,
)
from ia3_trainer.modeling.scoring import EvalOutputs

from conftest import TINY_ASSETS, generate_one_by_one, tiny_recipe


SENTENCES = [json.loads(line)["sentence"] for line in (TINY_ASSETS / "tiny-sentiment.jsonl").read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def summaries(tmp_path, n=120):
    """Documents of three sentences, each summarised by its first sentence: free text, every target distinct."""
    rows = [{"document": " ".join(SENTENCES[3 * i: 3 * i + 3]), "summary": SENTENCES[3 * i]} for i in range(n)]
    return write_jsonl(tmp_path / "summaries.jsonl", rows)


def summary_recipe(tmp_path, **overrides):
    return tiny_recipe(tmp_path, **{
        "data.data_files": {"train": summaries(tmp_path)}, "data.text_column": "document",
        "data.label_column": "summary", "data.label_names": None, "data.max_source_length": 64,
        "data.max_target_length": 24, "data.max_eval_samples": 12, "eval.metrics": ["perplexity", "rouge"],
        "training.max_steps": 2, **overrides,
    })


# --- metric functions ------------------------------------------------------------------------------------------


def test_rouge_matches_a_hand_count():
    # unigrams: 2 of 3 shared -> F1 2/3; bigrams: "a b" shared of 2 each -> 1/2; LCS "a b" -> 2/3
    assert rouge(["a b c"], ["a b d"]) == pytest.approx(
        {"rouge1": 2 / 3, "rouge2": 0.5, "rougeL": 2 / 3, "rougeLsum": 2 / 3}
    )
    assert rouge(["the cat", "x"], ["the cat", "y"])["rouge1"] == pytest.approx(0.5)  # mean over examples


def test_rouge_counts_every_script():
    # rouge_score's own tokenizer keeps [a-z0-9] only: both of these scored 0 before.
    # Russian, by words: 5 of 6 reference words, all 5 predicted -> P 1, R 5/6, F1 10/11; bigrams 3 of 5 and 4.
    russian = rouge(["Прибыль выросла на 12 процентов"], ["Прибыль компании выросла на 12 процентов"])
    assert russian == pytest.approx({"rouge1": 10 / 11, "rouge2": 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5),
                                     "rougeL": 10 / 11, "rougeLsum": 10 / 11})
    # Chinese, by characters: 7 of 13 reference characters, all 7 predicted -> F1 2*1*(7/13)/(1+7/13) = 0.7.
    assert rouge(["公司利润增长了"], ["公司的利润增长了百分之十二"])["rouge1"] == pytest.approx(0.7)
    assert rouge(["Прибыль"], ["прибыль"])["rouge1"] == 1.0  # lowercased, as rouge_score does
    # On ASCII text the tokens are rouge_score's own.
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat.", "Profit rose 12% in Q3, it's said", "x_y z"]
    references = ["a cat sat on a mat", "profit rose by 12 % in q3 it is said", "x y"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    own = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    expected = {key: sum(s[key].fmeasure for s in own) / len(own) for key in own[0]}
    assert rouge(predictions, references) == pytest.approx(expected)


def test_sacrebleu_and_chrf():
    assert sacrebleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == {"sacrebleu": pytest.approx(100)}
    assert sacrebleu(["completely different words here"], ["the cat sat on the mat"])["sacrebleu"] < 5
    assert chrf(["abcdef"], ["abcdef"]) == {"chrf": pytest.approx(100)}
    assert 0 < chrf(["le chat"], ["le chien"])["chrf"] < 100


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"^the rouge metric needs the rouge_score package; pip install rouge-score"):
        text_metric("rouge")
    with pytest.raises(ImportError, match="pip install rouge-score"):
        check_metrics(["perplexity", "rouge"])  # what from_recipe runs before the model loads


def test_evaluate_load_works_with_a_local_metric_script(tmp_path):
    script = tmp_path / "first_char.py"
    script.write_text(
        "import datasets\nimport evaluate\n\n\n"
        "class FirstChar(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='', features="
        "datasets.Features({'predictions': datasets.Value('string'), 'references': datasets.Value('string')}))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        hits = [p[:1] == r[:1] for p, r in zip(predictions, references)]\n"
        "        return {'first_char': sum(hits) / len(hits), 'text': 'dropped: not a number'}\n"
    )
    compute = evaluate_metric(str(script))
    assert compute(["abc", "xyz"], ["ab", "ab"]) == {"first_char": 0.5}


def test_needs_generation():
    assert not needs_generation(["perplexity", "rank_accuracy"])
    assert needs_generation(["perplexity", "rouge"]) and needs_generation(["label_accuracy"])


def test_compute_metrics_reports_only_what_is_asked(tokenizer):
    ids = np.array([tokenizer(text_target=t)["input_ids"] for t in ["negative", "positive"]])
    outputs = EvalOutputs(labels=ids, generated=ids, nll_sum=np.array([1.0, 1.0]), token_count=np.array([2, 2]),
                          rank_choice=np.array([0, 0]))
    labels = ["negative", "positive"]
    assert eval_metrics(outputs, ["rank_accuracy", "rouge"], tokenizer, labels) == {
        "rank_accuracy": 0.5, "rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0, "rougeLsum": 1.0}
    default = eval_metrics(outputs, ["perplexity", "label_accuracy", "rank_accuracy"], tokenizer, labels)
    assert default == {"perplexity": pytest.approx(math.exp(0.5)), "label_accuracy": 1.0, "rank_accuracy": 0.5}


# --- the recipe field ------------------------------------------------------------------------------------------


def test_eval_metrics_are_checked_with_did_you_mean(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe(tmp_path, **{"eval.metrics": ["rogue", "bleu", "evaluate:meteor", "perplexity",
                                                               "perplexity"]}))
    errors = info.value.errors
    assert errors[0].startswith("<recipe>: eval.metrics: unknown metric 'rogue'; did you mean 'rouge'? (known: ")
    assert errors[1].startswith("<recipe>: eval.metrics: unknown metric 'bleu'; did you mean 'sacrebleu'?")
    assert errors[2].startswith("<recipe>: eval.metrics: 'evaluate:meteor': recipes cannot load evaluate scripts")
    assert errors[3].startswith("<recipe>: eval.metrics: has duplicates")
    with pytest.raises(RecipeError, match=r"eval.metric: unknown key; did you mean 'eval.metrics'\?"):
        load_recipe(tiny_recipe(tmp_path), ["eval.metric=[\"rouge\"]"])
    recipe = load_recipe(tiny_recipe(tmp_path), ['eval.metrics=["perplexity", "chrf"]'])
    assert recipe.eval.metrics == ["perplexity", "chrf"]
    assert load_recipe(tiny_recipe(tmp_path)).to_dict()["eval"] == {
        "metrics": ["perplexity", "label_accuracy", "rank_accuracy"]
    }


# --- data rules for free text --------------------------------------------------------------------------------------


def test_free_text_targets_are_truncated_with_a_logged_count(tmp_path, tokenizer, caplog):
    raw = summary_recipe(tmp_path, **{"data.max_target_length": 16, "data.max_train_samples": None,
                                      "data.max_eval_samples": None})
    with caplog.at_level(logging.WARNING, logger="ia3_trainer.data"):
        prepared = prepare_data(load_recipe(raw).data, tokenizer)
    lengths = [len(tokenizer(text_target=s)["input_ids"]) for s in SENTENCES[0:360:3]]  # the 120 summaries
    over = sum(n > 16 for n in lengths)
    assert 0 < over < 120
    assert f"{over} of 120 distinct targets are longer than data.max_target_length=16 tokens and are truncated " \
           f"(longest: {max(lengths)})" in caplog.text
    assert prepared.label_names is None and prepared.max_label_tokens == 16
    assert max(len(ids) for ids in prepared.train_dataset["labels"]) == 16


def test_class_labels_that_do_not_fit_are_still_an_error(tmp_path, tokenizer):
    data = load_recipe(tiny_recipe(tmp_path, **{"data.max_target_length": 1})).data
    with pytest.raises(RecipeError, match="data.max_target_length: label 'negative' is 2 tokens"):
        prepare_data(data, tokenizer)


def test_dotted_columns_pick_nested_fields(tmp_path, tokenizer):
    rows = [{"id": i, "translation": {"en": s, "fr": " ".join(reversed(s.split()))}} for i, s in enumerate(SENTENCES)]
    raw = tiny_recipe(tmp_path, **{
        "data.data_files": {"train": write_jsonl(tmp_path / "books.jsonl", rows)},
        "data.text_column": "translation.en", "data.label_column": "translation.fr", "data.label_names": None,
        "data.max_target_length": 32, "data.source_prefix": "translate to French ",
    })
    prepared = prepare_data(load_recipe(raw).data, tokenizer)
    source = tokenizer.decode(prepared.train_dataset[0]["input_ids"], skip_special_tokens=True)
    target = tokenizer.decode(prepared.train_dataset[0]["labels"], skip_special_tokens=True)
    assert source.startswith("translate to French ")
    assert target.split() == list(reversed(source.removeprefix("translate to French ").split()))
    with pytest.raises(RecipeError, match=r"data.label_column: no column 'translation.de' in split 'train'; its "
                                          r"columns are \['id', 'translation.en', 'translation.fr'\]"):
        prepare_data(load_recipe(raw, {"data.label_column": "translation.de"}).data, tokenizer)


# --- end to end ----------------------------------------------------------------------------------------------------


def test_summarisation_trains_and_reports_rouge(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(summary_recipe(tmp_path))
    assert trainer.candidate_labels is None and trainer.max_new_tokens is None  # bounded by each dataset's targets
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_perplexity"} <= set(metrics)
    predictions, references = generate_one_by_one(trainer)
    expected = rouge(predictions, references)
    assert {key: metrics[f"eval_{key}"] for key in expected} == pytest.approx(expected)
    assert not {"eval_label_accuracy", "eval_rank_accuracy"} & set(metrics)


def test_text_metrics_share_one_generation_per_batch(tmp_path):
    metrics = ["perplexity", "label_accuracy", "rouge", "sacrebleu", "chrf"]
    trainer = IA3Seq2SeqTrainer.from_recipe(summary_recipe(tmp_path, **{
        "eval.metrics": metrics, "training.per_device_eval_batch_size": 4}))
    calls = []
    generate = trainer.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    trainer.model.generate = counting_generate
    result = trainer.evaluate()
    assert len(trainer.eval_dataset) == 12
    assert len(calls) == 3  # batches of 4: one generate per batch, shared by the four text metrics
    assert {"eval_label_accuracy", "eval_rouge1", "eval_sacrebleu", "eval_chrf"} <= set(result)
    predictions, references = generate_one_by_one(trainer)
    assert result["eval_sacrebleu"] == pytest.approx(sacrebleu(predictions, references)["sacrebleu"])
    assert result["eval_chrf"] == pytest.approx(chrf(predictions, references)["chrf"])
