"""One evaluation path: `ia3-trainer train` evaluates once per evaluation point and builds its report from that pass;
`predict()` has one contract; the generation bound follows the dataset evaluated; inference encodes as training did."""

import functools
import json
import warnings

import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from ia3_trainer import IA3Predictor, IA3Seq2SeqTrainer, IA3TrainingArguments
from ia3_trainer.cli.main import main
from ia3_trainer.data.encoding import encode_batch
from ia3_trainer.data.labels import longest_labels
from ia3_trainer.evaluation.metrics import decode
from ia3_trainer.layout import REPORT_FILE

from conftest import tiny_recipe


def count_eval_passes(monkeypatch) -> list:
    """Record every forward call of a T5 in eval mode that runs its encoder (gets `input_ids`): one per eval batch,
    the loss pass (rank classification and generation reuse its encoder output and pass `encoder_outputs`)."""
    calls = []
    forward = T5ForConditionalGeneration.forward

    @functools.wraps(forward)  # Trainer reads the signature to keep the dataset's model columns
    def counting(self, *args, **kwargs):
        if not self.training and kwargs.get("input_ids") is not None:
            calls.append(kwargs["input_ids"].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(T5ForConditionalGeneration, "forward", counting)
    return calls


def test_train_command_evaluates_once_per_evaluation_point(tmp_path, monkeypatch, capsys):
    # 24 eval examples in batches of 8: 3 loss passes per evaluation; evaluations at steps 3 and 6.
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 6, "training.eval_strategy": "steps",
                                   "training.eval_steps": 3, "training.per_device_eval_batch_size": 8,
                                   "training.bf16": False})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    calls = count_eval_passes(monkeypatch)
    assert main(["train", str(path)]) == 0
    assert calls == [8, 8, 8] * 2, "the end of train evaluated again"
    capsys.readouterr()

    out = tmp_path / "out"
    report = json.loads((out / REPORT_FILE).read_text())
    results = json.loads((out / "all_results.json").read_text())
    last = [entry for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "eval_loss" in entry][-1]
    assert last["step"] == report["step"] == 6
    # The report is that evaluation: the same numbers, exactly.
    assert report["label_accuracy"] == results["eval_label_accuracy"] == last["eval_label_accuracy"]
    assert report["loss"] == pytest.approx(results["eval_loss"], abs=1e-12)
    assert report["perplexity"] == pytest.approx(results["eval_perplexity"], abs=1e-9)
    assert report["examples"] == 24


def test_train_without_evaluation_at_the_last_step_evaluates_once_at_the_end(tmp_path, monkeypatch, capsys):
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 4, "training.eval_strategy": "no",
                                   "training.per_device_eval_batch_size": 12})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    calls = count_eval_passes(monkeypatch)
    assert main(["train", str(path)]) == 0
    assert calls == [12, 12]
    assert "eval_label_accuracy=" in capsys.readouterr().out


def test_eval_loss_is_the_exact_token_mean_whatever_the_batch_size(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 3, "training.bf16": False}))
    trainer.train()
    losses = []
    for size in (1, 5, 24):
        trainer.args.per_device_eval_batch_size = size
        metrics = trainer.evaluate()
        losses.append(metrics["eval_loss"])
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)
    outputs = trainer.last_evaluation.outputs
    assert outputs.loss == pytest.approx(np.sum(outputs.nll_sum) / np.sum(outputs.token_count))
    assert len(outputs.nll_sum) == len(trainer.eval_dataset) == 24


def test_predict_returns_generated_ids_with_or_without_labels(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 3, "training.bf16": False}))
    trainer.train()
    with_labels = trainer.predict(trainer.eval_dataset)
    without = trainer.predict(trainer.eval_dataset.remove_columns("labels"))
    assert isinstance(with_labels.predictions, np.ndarray) and with_labels.predictions.dtype.kind == "i"
    assert decode(with_labels.predictions, trainer.processing_class) == decode(without.predictions,
                                                                               trainer.processing_class)
    assert without.label_ids is None and "test_label_accuracy" not in without.metrics
    assert {"test_loss", "test_label_accuracy", "test_rank_accuracy"} <= set(with_labels.metrics)
    # The same texts as greedy generation one example at a time.
    model, tokenizer = trainer.model.eval(), trainer.processing_class
    row = trainer.eval_dataset[0]
    with torch.no_grad():
        single = model.generate(input_ids=torch.tensor([row["input_ids"]]), max_new_tokens=trainer.max_new_tokens)
    assert decode(single.numpy(), tokenizer)[0] == decode(with_labels.predictions[:1], tokenizer)[0]


def test_predict_generates_when_no_metric_needs_generation(tmp_path):
    # evaluate() skips generate when only perplexity and rank accuracy are asked for; predict() still returns ids.
    trainer = IA3Seq2SeqTrainer.from_recipe(
        tiny_recipe(tmp_path, **{"eval.metrics": ["perplexity", "rank_accuracy"], "training.bf16": False}))
    assert "eval_label_accuracy" not in trainer.evaluate() and trainer.last_evaluation.outputs.generated is None
    output = trainer.predict(trainer.eval_dataset)
    assert isinstance(output.predictions, np.ndarray) and output.predictions.dtype.kind == "i"
    assert output.predictions.shape[0] == 24 and {"test_loss", "test_rank_accuracy"} <= set(output.metrics)
    assert "eval_label_accuracy" not in trainer.evaluate()  # predict() changed nothing for evaluate()


def test_free_text_evaluation_is_bounded_by_each_dataset_and_inference_by_the_target_length(tmp_path):
    # Without a label set the targets are free text: no fixed bound from the training data, so another dataset
    # evaluates up to its own longest target; inference.json keeps the longest a target could be in training.
    rows = [{"sentence": f"A: meeting {i}? B: at {i} pm.", "label": f"They meet at {i} pm" + " sharp" * (i % 3)}
            for i in range(40)]
    data = tmp_path / "talks.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{
        "data.data_files": {"train": str(data)}, "data.label_names": None, "data.max_target_length": 32,
        "eval.metrics": ["label_accuracy"]}))
    assert trainer.candidate_labels is None and trainer.max_new_tokens is None
    assert trainer.inference_settings()["max_new_tokens"] == 32
    short = trainer.eval_dataset.map(lambda row: {"labels": row["labels"][-1:]})  # EOS alone: one token
    assert trainer.generation_bound(short) == 1
    assert trainer.predict(short).predictions.shape[1] <= 1 + 1  # the decoder start token, then at most the bound
    longest = max(len(labels) for labels in trainer.eval_dataset["labels"])
    assert trainer.generation_bound(trainer.eval_dataset) == longest
    unlabeled = trainer.eval_dataset.remove_columns("labels")
    assert trainer.generation_bound(unlabeled) == 32  # no targets: the training bound
    assert trainer.predict(unlabeled).predictions.shape[0] == len(trainer.eval_dataset)
    # A stream is not read through for its longest target, whether its columns are known or not.
    assert longest_labels(trainer.eval_dataset.to_iterable_dataset()) is None
    stream = trainer.eval_dataset.to_iterable_dataset().map(lambda row: row)
    assert trainer.generation_bound(stream) == 32 and "eval_label_accuracy" in trainer.evaluate(stream)


def test_a_user_compute_metrics_gets_generated_ids_and_labels(tmp_path):
    seen = []

    def compute_metrics(eval_prediction):
        seen.append(eval_prediction)
        return {"rows": float(len(eval_prediction.predictions))}

    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path), compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    (prediction,) = seen
    assert prediction.predictions.shape[0] == prediction.label_ids.shape[0] == 24
    assert prediction.predictions.dtype.kind == prediction.label_ids.dtype.kind == "i"
    assert metrics["eval_rows"] == 24 and "eval_label_accuracy" in metrics


def test_a_user_compute_metrics_is_called_when_no_built_in_metric_generates(tmp_path):
    # Perplexity alone needs no generation; the user's compute_metrics does, so evaluation generates for it.
    seen = []

    def compute_metrics(eval_prediction):
        seen.append(eval_prediction)
        return {"rows": float(len(eval_prediction.predictions))}

    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"eval.metrics": ["perplexity"]}),
                                            compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == 24 and "eval_perplexity" in metrics and "eval_label_accuracy" not in metrics
    (prediction,) = seen
    assert prediction.predictions.dtype.kind == "i" and prediction.label_ids.shape[0] == 24
    # Without one, nothing is generated.
    plain = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"eval.metrics": ["perplexity"]}))
    assert "eval_generate_runtime" not in plain.evaluate() and plain.last_evaluation.outputs.generated is None


def test_rank_classification_follows_a_reassigned_label_set(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"eval.metrics": ["rank_accuracy"]}))

    def ranked():
        trainer.evaluate()
        return [trainer.candidate_labels[i] for i in trainer.last_evaluation.outputs.rank_choice]

    before = ranked()
    labels = trainer.candidate_labels
    trainer.candidate_labels = labels[1:] + labels[:1]  # every label at another index
    assert ranked() == before


def test_final_evaluation_reloads_the_best_model_and_evaluates_it(tmp_path):
    # "Best" is the highest eval loss (the first evaluation): the model at the end is another one, so the final
    # evaluation cannot reuse the last step's numbers; it must equal the evaluation logged at the best step.
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{
        "training.max_steps": 6, "training.eval_strategy": "steps", "training.eval_steps": 2,
        "training.save_strategy": "steps", "training.save_steps": 2, "training.load_best_model_at_end": True,
        "training.metric_for_best_model": "eval_loss", "training.greater_is_better": True, "training.bf16": False,
        "training.learning_rate": 0.3}))
    trainer.train()  # its last evaluation (after training, of the best model) is logged at the last step too
    logged = {}
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            logged.setdefault(entry["step"], entry)  # the evaluations made while training
    best = max(logged, key=lambda step: logged[step]["eval_loss"])
    assert trainer.state.best_global_step == best != trainer.state.global_step
    final = trainer.final_eval_metrics()
    assert final["eval_loss"] == pytest.approx(logged[best]["eval_loss"], rel=1e-6)
    assert final["eval_loss"] != pytest.approx(logged[trainer.state.global_step]["eval_loss"], rel=1e-6)
    assert trainer.last_evaluation.step == trainer.state.global_step


def test_evaluating_another_dataset_bounds_generation_by_its_own_labels(tmp_path, tokenizer, tiny_t5):
    args = IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False,
                                per_device_eval_batch_size=4, save_final_adapter=False)
    from datasets import Dataset

    def dataset(labels):
        texts = ["Sales rose by 12 % .", "Juniper Retail is based in Tampere ."] * 2
        return Dataset.from_dict({"sentence": texts, "label": labels}).map(
            lambda batch: encode_batch(batch, tokenizer, _data()), batched=True, remove_columns=["sentence", "label"])

    short = dataset(["positive", "neutral"] * 2)
    longer = dataset(["sales rose by twelve percent in the last quarter", "neutral"] * 2)
    trainer = IA3Seq2SeqTrainer(tiny_t5, args, eval_dataset=short, processing_class=tokenizer)
    bounds = []
    generate = trainer.model.generate

    def recording(**kwargs):
        bounds.append(kwargs.get("max_new_tokens"))
        return generate(**kwargs)

    trainer.model.generate = recording
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the model-agnostic default max_length warning
        trainer.evaluate()
        trainer.evaluate(longer)
    longest = max(len(ids) for ids in longer["labels"])
    assert longest > 2 and set(bounds) == {2, longest}


def _data():
    from ia3_trainer.recipe.loading import DataSection

    return DataSection(path="json", text_column="sentence", label_column="label", max_target_length=32)


class Prompted(IA3Seq2SeqTrainer):
    @classmethod
    def preprocess(cls, batch, tokenizer, data):
        batch = {**batch, data.text_column: [f"Review: {text} Sentiment?" for text in batch[data.text_column]]}
        return encode_batch(batch, tokenizer, data)


def test_inference_encodes_as_training_did(tmp_path):
    trainer = Prompted.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 3, "training.bf16": False}))
    trainer.train()
    out = tmp_path / "out"
    marker = json.loads((out / "inference.json").read_text())["encode"]
    assert marker == f"custom:{__name__}.Prompted.preprocess"
    with pytest.raises(ValueError, match=r"was trained with a custom preprocess \(.*Prompted.preprocess\); encode"):
        IA3Predictor.from_pretrained(out)

    texts = ["Juniper Retail said its net sales rose by 12 % .", "Northwind is based in Tampere ."]
    predictor = IA3Predictor.from_pretrained(out, encode=Prompted.preprocess)
    assert predictor.encode(texts) == IA3Predictor.from_trainer(trainer).encode(texts)
    expected = tokenizer_ids(trainer, f"Review: {texts[0]} Sentiment?")
    assert predictor.encode(texts)[0]["input_ids"] == expected
    assert predictor.predict(texts) == IA3Predictor.from_trainer(trainer).predict(texts)


def tokenizer_ids(trainer, text):
    limit = trainer.recipe.data.max_source_length
    return trainer.processing_class(text, max_length=limit, truncation=True)["input_ids"]
