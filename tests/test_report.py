"""Evaluation report: metric functions by hand, `ia3-trainer evaluate` against a direct computation, valid PNGs,
and the report written at the end of `ia3-trainer train`."""

import json
import logging
import math
import shutil
import struct
import sys

import numpy as np
import pytest
import torch

from ia3_trainer import IA3Seq2SeqTrainer, load_recipe
from ia3_trainer.cli.main import main
from ia3_trainer.data.encoding import build_collator
from ia3_trainer.data.preparation import prepare_data
from ia3_trainer.evaluation.metrics import OTHER_LABEL, confusion_matrix, decode, macro_f1, per_class_scores
from ia3_trainer.evaluation.report import build_report, read_log_history, write_report
from ia3_trainer.inference.predictor import IA3Predictor
from ia3_trainer.layout import REPORT_FILE
from ia3_trainer.modeling.scoring import EvalOutputs

from conftest import TINY_MODEL_DIR, tiny_recipe


def png_size(path) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a PNG; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    try:
        from PIL import Image
    except ImportError:
        return width, height
    with Image.open(path) as image:
        image.load()  # decodes every chunk: a truncated or corrupt file raises here
        assert image.size == (width, height)
    return width, height


def test_confusion_matrix_and_per_class_scores_by_hand():
    predictions = ["a", "a ", "b", "zzz", "b", "a"]
    references = ["a", "b", "b", "a", "c", " a"]
    matrix, columns = confusion_matrix(predictions, references, ["a", "b", "c"])
    assert columns == ["a", "b", "c", OTHER_LABEL]
    assert matrix.tolist() == [[2, 0, 0, 1], [1, 1, 0, 0], [0, 1, 0, 0]]
    scores = per_class_scores(matrix, ["a", "b", "c"])
    assert scores["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert scores["b"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert scores["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted: 0, not nan
    assert macro_f1(scores) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert confusion_matrix(["a"], ["a"], ["a", "b"])[1] == ["a", "b"]  # no (other) column when not needed
    with pytest.raises(ValueError, match=r"references \['d'\] are not in labels"):
        confusion_matrix(["a"], ["d"], ["a", "b"])


def ids(tokenizer, texts):
    """Target ids of `texts`, padded with -100 as the evaluation loop pads them."""
    encoded = tokenizer(text_target=texts)["input_ids"]
    width = max(len(row) for row in encoded)
    return np.array([row + [-100] * (width - len(row)) for row in encoded])


def test_free_text_report_has_no_classes_and_writes_valid_json(tmp_path, tokenizer):
    references = ids(tokenizer, ["sales rose", "profit"])
    outputs = EvalOutputs(labels=references, generated=ids(tokenizer, ["sales rose", "loss"]),
                          teacher_forced=references, nll_sum=np.array([1.0, 3.0]), token_count=np.array([2, 2]))
    report = build_report(outputs, tokenizer, None, adapter="a")
    assert report["predictions"] == "generated"
    assert report["label_accuracy"] == 0.5 and report["teacher_forced_accuracy"] == 1.0
    assert report["loss"] == 1.0 and report["perplexity"] == pytest.approx(math.e)
    assert report["macro_f1"] is None and "per_class" not in report and "confusion_matrix" not in report
    empty = build_report(EvalOutputs(labels=np.zeros((0, 1), dtype=int), nll_sum=np.zeros(0),
                                     token_count=np.zeros(0)), tokenizer)
    write_report(empty, tmp_path)
    assert json.loads((tmp_path / REPORT_FILE).read_text())["perplexity"] is None  # nan is not JSON


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped tiny recipe (random-init base kept beside the adapter) trained 60 steps, which predicts all
    three classes, with evaluation and a checkpoint every 30 steps; and its own evaluate() metrics."""
    folder = tmp_path_factory.mktemp("report")
    raw = tiny_recipe(folder, **{
        "training.max_steps": 60, "training.eval_strategy": "steps", "training.eval_steps": 30,
        "training.save_strategy": "steps", "training.save_steps": 30, "training.per_device_eval_batch_size": 7,
        "data.source_prefix": "review: ",
        # bf16 autocast (on by default on CPUs with AMX) moves the last digits of every number compared here.
        "training.bf16": False,
    })
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    trainer.train()
    return trainer, trainer.evaluate(), folder / "out"


def direct_report(trainer):
    """Every number of the report computed one example at a time (no padding) with plain Python counting."""
    model, tokenizer = trainer.model.eval(), trainer.processing_class
    collate = build_collator(tokenizer, model)
    nll, tokens, generated, forced, references = 0.0, 0, [], [], []
    for row in trainer.eval_dataset:
        batch = collate([row])
        with torch.no_grad():
            logits = model(**batch).logits
            nll += torch.nn.functional.cross_entropy(logits[0], batch["labels"][0], reduction="sum").item()
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=trainer.max_new_tokens)
        tokens += len(row["labels"])
        generated += decode(out.numpy(), tokenizer)
        forced += decode(logits[:, : len(row["labels"])].argmax(-1).numpy(), tokenizer)  # label positions only
        references += decode(np.array([row["labels"]]), tokenizer)
    pairs = list(zip(generated, references, strict=True))
    per_class = {}
    for label in trainer.candidate_labels:
        tp = sum(g == r == label for g, r in pairs)
        predicted, support = sum(g == label for g, _ in pairs), sum(r == label for _, r in pairs)
        precision, recall = (tp / predicted if predicted else 0.0), (tp / support if support else 0.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "examples": len(pairs),
        "label_accuracy": sum(g == r for g, r in pairs) / len(pairs),
        "teacher_forced_accuracy": sum(f == r for f, r in zip(forced, references, strict=True)) / len(pairs),
        "loss": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "per_class": per_class,
        "macro_f1": sum(s["f1"] for s in per_class.values()) / len(per_class),
        "other": sum(g not in trainer.candidate_labels for g in generated),
    }


def test_evaluate_command_agrees_with_a_direct_computation(trained, capsys):
    trainer, metrics, out = trained
    assert main(["evaluate", str(out), "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "label_accuracy=" in printed
    assert "  teacher_forced_accuracy=" in printed and printed.splitlines()[0].endswith("; not a label accuracy)")
    report = json.loads((out / REPORT_FILE).read_text())

    direct = direct_report(trainer)
    assert report["examples"] == direct["examples"] == 24
    for key in ("label_accuracy", "teacher_forced_accuracy", "macro_f1"):
        assert report[key] == pytest.approx(direct[key]), key
    for key in ("loss", "perplexity"):
        assert report[key] == pytest.approx(direct[key], rel=1e-4), key
    assert report["per_class"].keys() == direct["per_class"].keys()
    for label, scores in direct["per_class"].items():
        assert report["per_class"][label] == pytest.approx(scores), label
    # ... and with the trainer's own evaluation.
    assert report["label_accuracy"] == pytest.approx(metrics["eval_label_accuracy"])
    assert report["perplexity"] == pytest.approx(metrics["eval_perplexity"], rel=1e-4)

    matrix = np.array(report["confusion_matrix"]["counts"])
    assert report["confusion_matrix"]["references"] == trainer.candidate_labels
    assert matrix.sum() == 24 and np.trace(matrix) == round(report["label_accuracy"] * 24)
    assert matrix[:, len(trainer.candidate_labels):].sum() == direct["other"]
    other = report["other_predictions"]  # what the "(other)" column counts, most frequent first
    assert sum(other.values()) == direct["other"] or len(other) == 20
    assert not set(other) & set(trainer.candidate_labels) and list(other.values()) == sorted(other.values())[::-1]
    assert report["teacher_forced_accuracy_note"].startswith("Not a label accuracy")
    assert report["plots"] == ["confusion_matrix.png", "training_curves.png"]
    for name in report["plots"]:
        width, height = png_size(out / name)
        assert 200 <= width <= 1200 and 150 <= height <= 900, (name, width, height)
        assert (out / name).stat().st_size < 100_000


def test_training_curves_come_from_the_latest_checkpoint(trained, tmp_path):
    _, _, out = trained
    assert read_log_history(out) == json.loads((out / "trainer_state.json").read_text())["log_history"]
    # A folder without its trainer_state.json (an interrupted run): the newest checkpoint's.
    shutil.copytree(out / "checkpoint-60", tmp_path / "run" / "checkpoint-60")
    history = read_log_history(tmp_path / "run")
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [30, 60]
    assert sum("loss" in entry for entry in history) == 60


def test_training_curves_read_nan_losses_and_skip_a_state_without_history(tmp_path, caplog):
    # A skipped non-finite step logs its loss as NaN; trainer_state.json then holds NaN, which strict JSON refuses.
    (tmp_path / "trainer_state.json").write_text(
        '{"log_history": [{"loss": NaN, "step": 1}, {"loss": 0.5, "step": 2}, "junk"]}')
    history = read_log_history(tmp_path)
    assert [entry["step"] for entry in history] == [1, 2] and math.isnan(history[0]["loss"])
    (tmp_path / "trainer_state.json").write_text('{"log_history": {"loss": 1}}')
    with caplog.at_level(logging.WARNING, logger="ia3_trainer"):
        assert read_log_history(tmp_path) == []
    assert "has no log_history list" in caplog.text


def test_random_init_adapter_loads_from_a_checkpoint_and_after_a_move(trained, tmp_path):
    # Its base exists only as out/base-model: checkpoints point at the config-only recipe folder, and the final
    # adapter at an absolute path that a move breaks.
    import shutil

    _, _, out = trained
    lines = (TINY_MODEL_DIR.parent / "tiny-sentiment.jsonl").read_text().splitlines()[:16]
    texts = [json.loads(line)["sentence"] for line in lines]
    expected = IA3Predictor.from_pretrained(out).predict(texts)
    assert IA3Predictor.from_pretrained(out / "checkpoint-60").predict(texts) == expected  # the last step
    moved = shutil.copytree(out, tmp_path / "moved", ignore=shutil.ignore_patterns("checkpoint-*"))
    shutil.rmtree(out / "base-model")
    try:
        assert IA3Predictor.from_pretrained(moved).predict(texts) == expected
    finally:
        shutil.copytree(moved / "base-model", out / "base-model")
    # A checkpoint from before the end of training has no base-model/ beside it yet.
    early = shutil.copytree(out / "checkpoint-60", tmp_path / "running" / "checkpoint-30")
    with pytest.raises(ValueError, match="is saved as base-model/ only when training finishes"):
        IA3Predictor.from_pretrained(early)


def test_evaluate_on_a_file_and_to_another_folder(trained, tmp_path, capsys):
    _, _, out = trained
    rows = [("Juniper Retail said its net sales rose by 12 % .", "positive"),
            ("Northwind Logistics said its net sales shrank by 18 % last year .", "negative"),
            ("Juniper Retail is headquartered in Tampere .", "neutral")]
    data = tmp_path / "extra.csv"
    data.write_text("sentence,label\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
    assert main(["evaluate", str(out), "--data", str(data), "--output-dir", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / REPORT_FILE).read_text())
    assert report["examples"] == 3 and report["data"] == str(data)
    predictions = IA3Predictor.from_pretrained(out).predict([text for text, _ in rows])
    expected = np.mean([p == label for p, (_, label) in zip(predictions, rows, strict=True)])
    assert report["label_accuracy"] == pytest.approx(expected)
    assert report["plots"] == ["confusion_matrix.png", "training_curves.png"]
    capsys.readouterr()


def test_evaluate_reads_a_latin_1_file_with_its_encoding_and_says_so_in_one_line_without(trained, tmp_path, capsys):
    _, _, out = trained
    rows = [("Café Nord said its net sales rose by 12 % .", "positive"), ("Müller AG is in Tampere .", "neutral")]
    data = tmp_path / "latin.csv"
    data.write_bytes(("sentence,label\n" + "".join(f"{text},{label}\n" for text, label in rows)).encode("latin-1"))
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(out), "--data", str(data), "--output-dir", str(tmp_path / "r")])
    assert info.value.code == 2
    err = capsys.readouterr().err  # one line (not datasets' "Failed to read file" first), in the options' terms
    assert err.startswith("ia3-trainer: error: --data: latin.csv is not UTF-8 text (invalid continuation byte at ")
    assert err.endswith("); save it as UTF-8, or pass its --encoding, e.g. --encoding latin-1\n")
    assert err.count("\n") == 1
    assert main(["evaluate", str(out), "--data", str(data), "--output-dir", str(tmp_path / "r"),
                 "--encoding", "latin-1"]) == 0
    assert json.loads((tmp_path / "r" / REPORT_FILE).read_text())["examples"] == 2
    capsys.readouterr()


def test_without_matplotlib_only_the_json_is_written(trained, tmp_path, monkeypatch, caplog):
    trainer, _, _ = trained
    outputs = IA3Predictor.from_trainer(trainer).score(trainer.eval_dataset)
    report = build_report(outputs, trainer.processing_class, trainer.candidate_labels)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with caplog.at_level(logging.WARNING, logger="ia3_trainer.evaluation.report"):
        paths = write_report(report, tmp_path, trainer.state.log_history)
    assert [p.name for p in paths] == [REPORT_FILE] and sorted(p.name for p in tmp_path.iterdir()) == [REPORT_FILE]
    assert 'pip install "ia3-trainer[plots]"' in caplog.text


def test_train_command_writes_the_report_and_trainer_state(tmp_path, capsys):
    path = tmp_path / "recipe.json"
    overrides = {"training.max_steps": 6, "training.logging_steps": 2, "training.bf16": False}
    path.write_text(json.dumps(tiny_recipe(tmp_path, **overrides)))
    assert main(["train", str(path)]) == 0
    assert "report: " in capsys.readouterr().out
    out = tmp_path / "out"
    report = json.loads((out / REPORT_FILE).read_text())
    results = json.loads((out / "all_results.json").read_text())
    assert report["label_accuracy"] == pytest.approx(results["eval_label_accuracy"])
    assert report["perplexity"] == pytest.approx(results["eval_perplexity"], rel=1e-4)
    assert (out / "trainer_state.json").is_file()
    for name in report["plots"]:
        png_size(out / name)
    assert report["plots"] == ["confusion_matrix.png", "training_curves.png"]
    # The random-init base saved beside the adapter reloads with its trained weights: same numbers again.
    predictor = IA3Predictor.from_pretrained(out)
    recipe = load_recipe(json.loads((out / "recipe.json").read_text()))
    again = build_report(predictor.score(prepare_data(recipe.data, predictor.tokenizer).eval_dataset),
                         predictor.tokenizer, recipe.data.label_names)
    assert again["label_accuracy"] == pytest.approx(report["label_accuracy"])
    assert again["loss"] == pytest.approx(report["loss"], rel=1e-5)


def test_results_and_trainer_state_are_written_whole(tmp_path, monkeypatch):
    # `ia3-trainer push` reads all_results.json and `evaluate` trainer_state.json; Trainer writes both in place, so a
    # full disk left them cut. Now each is the whole new file or the previous one.
    import dataclasses
    import errno
    import os

    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    trainer.save_state()
    trainer.save_metrics("all", {"train_loss": 1.5, "eval_perplexity": float("inf")})
    state, results = (out / "trainer_state.json").read_bytes(), (out / "all_results.json").read_bytes()
    assert state == (json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n").encode()
    assert json.loads(results) == {"train_loss": 1.5, "eval_perplexity": float("inf")}  # what Trainer writes
    trainer.save_metrics("eval", {"eval_loss": 0.5})  # combined: all_results.json gains it
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] == 0.5
    results = (out / "all_results.json").read_bytes()

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer.state.global_step = 7
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_state()
    with pytest.raises(OSError, match="No space left"):
        trainer.save_metrics("all", {"train_loss": 0.25})
    assert (out / "trainer_state.json").read_bytes() == state and (out / "all_results.json").read_bytes() == results
    assert sorted(path.name for path in out.iterdir()) == ["all_results.json", "eval_results.json",
                                                           "trainer_state.json"]  # no temporary file left


def test_teacher_forced_accuracy_is_high_for_an_untrained_model(tmp_path):
    # Why the report labels it: the shipped tiny T5 (tied embeddings) scores well on it before any training.
    recipe = load_recipe(tiny_recipe(tmp_path))
    tokenizer = IA3Seq2SeqTrainer.load_tokenizer(recipe)
    model = IA3Seq2SeqTrainer.wrap_model_with_ia3(IA3Seq2SeqTrainer.load_model(recipe), recipe.ia3_config())
    prepared = prepare_data(recipe.data, tokenizer)
    report = build_report(IA3Predictor(model, tokenizer, recipe=recipe).score(prepared.eval_dataset), tokenizer,
                          prepared.label_names)
    assert report["label_accuracy"] < 0.2 < 0.6 < report["teacher_forced_accuracy"]
