"""Many labels: `ia3-trainer train` on 200 and 2000 classes writes its report in bounded time and memory (the plot of
every class grew quadratically: 150 labels took 2 minutes and 5 GB, 2000 did not finish in 15), and rank
classification scores every candidate."""

import json
import random
import struct
import subprocess
import sys

import numpy as np

from ia3_trainer.evaluation.report import OTHER_CLASSES, most_frequent_classes

from conftest import REPO, TINY_MODEL_DIR


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


RUNNER = r"""
import json, resource, sys, time
from ia3_trainer.cli.main import main

results = []
for recipe in sys.argv[1:]:
    started = time.perf_counter()
    code = main(["train", recipe])
    results.append({"code": code, "seconds": time.perf_counter() - started,
                    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024})
print(json.dumps(results))
"""


def many_label_recipe(folder, classes: int) -> str:
    """Two examples of each of `classes` labels; 16 held out for evaluation, scored against every label."""
    folder.mkdir()
    random.seed(classes)
    words = "sales profit rose fell market shares quarter revenue company board said percent".split()
    rows = [{"sentence": " ".join(random.choices(words, k=10)) + f" item {i % classes}", "label": f"c{i % classes}"}
            for i in range(2 * classes)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = json.loads((REPO / "recipes" / "tiny.json").read_text())
    raw["model"]["name_or_path"] = str(TINY_MODEL_DIR)
    raw["data"].update(data_files={"train": str(folder / "data.jsonl")}, label_names=[f"c{i}" for i in range(classes)],
                       validation_size=16, max_train_samples=None, max_eval_samples=None, max_target_length=8)
    raw["training"].update(output_dir=str(folder / "run"), max_steps=1, eval_strategy="no", save_strategy="no",
                           per_device_eval_batch_size=16, use_cpu=True)
    (folder / "recipe.json").write_text(json.dumps(raw))
    return str(folder / "recipe.json")


def test_200_and_2000_labels_report_in_bounded_time_and_memory(tmp_path):
    counts = (200, 2000)
    recipes = [many_label_recipe(tmp_path / str(count), count) for count in counts]
    result = subprocess.run([sys.executable, "-c", RUNNER, *recipes], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    for count, run in zip(counts, runs, strict=True):
        assert run["code"] == 0 and run["seconds"] < 90, run  # about 10 s and 20 s on one free core
        folder = tmp_path / str(count) / "run"
        report = json.loads((folder / "eval_report.json").read_text())
        assert report["examples"] == 16 and len(report["per_class"]) == count
        matrix = report["confusion_matrix"]
        assert len(matrix["references"]) == count
        if count <= 200:
            assert len(matrix["counts"]) == count and "cells" not in matrix
        else:  # only the non-zero cells: at most one per example
            assert "counts" not in matrix and sum(cell[2] for cell in matrix["cells"]) == 16
        width, height = png_size(folder / "confusion_matrix.png")  # 30 classes and (other classes): bounded
        assert width <= 3000 and height <= 2400
        summary = json.loads((folder / "all_results.json").read_text())
        # Rank classification ran over every label: an accuracy over the 16 examples (chunked scoring is checked
        # against one pass in test_mixed_adapters).
        hits = summary["eval_rank_accuracy"] * 16
        assert 0 <= hits <= 16 and abs(hits - round(hits)) < 1e-6, summary
    assert runs[-1]["peak_mb"] < 2500, runs  # about 1 GB


def test_the_plot_keeps_the_most_frequent_classes_and_sums_the_rest():
    rows = ["a", "b", "c", "d"]
    columns = [*rows, "(other)"]
    matrix = np.array([
        [1, 0, 0, 0, 0],  # a: 1 example
        [0, 5, 1, 0, 1],  # b: 7
        [0, 2, 2, 0, 0],  # c: 4
        [3, 0, 0, 0, 0],  # d: 3
    ])
    cut, names, cut_columns = most_frequent_classes(matrix, rows, columns, limit=2)
    assert names == cut_columns == ["b", "c", OTHER_CLASSES]
    assert cut.tolist() == [
        [5, 1, 1],  # b: its "(other)" prediction goes to the summed column
        [2, 2, 0],
        [0, 0, 4],  # a and d: a->a (1) and d->a (3) are both outside the kept columns
    ]
    assert cut.sum() == matrix.sum()
    assert most_frequent_classes(matrix, rows, columns, limit=4)[0] is matrix  # few enough: as given


class Counted:
    """A function that counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def test_prefix_tree_scoring_gives_the_scores_of_decoding_every_label_whole(tiny_t5, tokenizer, monkeypatch):
    """Rank classification scores each distinct label prefix once (`score_candidates`); the scores and the ranking
    are those of decoding every label's whole sequence for every text (`score_sequences`, and the model's own loss,
    one label at a time), whatever the chunking."""
    import torch

    from ia3_trainer.modeling import scoring

    random.seed(1)
    words = ["positive", "negative", "neutral", "up", "down", "sales rose", "sales fell", "a", "b c d e"]
    labels = sorted({*words, *(f"c{i}" for i in range(300)),
                     *(" ".join(random.choices(words, k=3)) for _ in range(60))})
    candidates = scoring.candidate_label_ids(tokenizer, labels)
    texts = ["Sales rose by 12 % .", "Profit fell .", "The board met on Monday to discuss the quarter ."]
    model = tiny_t5.eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.get_encoder()(**batch).last_hidden_state
        reference = scoring.score_sequences(model, hidden, batch["attention_mask"], candidates)
        # rank_candidates' branch and bound finds what argmax over every score finds, ties (a label given twice:
        # the first) included, without falling back to scoring every label.
        twice = torch.cat([candidates, candidates[reference.argmax(dim=-1)]])
        monkeypatch.setattr(scoring, "score_sequences", fallback := Counted(scoring.score_sequences))
        for normalize in (True, False):
            expected = scoring.score_sequences(model, hidden, batch["attention_mask"], candidates, normalize)
            for rows in (4096, 40):
                got = scoring.score_candidates(model, (hidden,), batch["attention_mask"], candidates, normalize,
                                               chunk_rows=rows)
                torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
                assert torch.equal(got.argmax(dim=-1), expected.argmax(dim=-1))
                before = fallback.calls
                chosen = scoring.rank_candidates(model, (hidden,), batch["attention_mask"], twice, normalize,
                                                 chunk_rows=rows)
                assert fallback.calls == before, "rank_candidates fell back to scoring every label"
                assert torch.equal(chosen, expected.argmax(dim=-1)), (normalize, rows)
        got = scoring.score_candidates(model, (hidden,), batch["attention_mask"], candidates)
        # Weights gathered module by module (FSDP, ZeRO-3): every label decoded whole, the same choice.
        inputs = {**batch, "labels": candidates[:3]}
        assert torch.equal(scoring.score_batch(model, inputs, candidate_ids=candidates, generate=False,
                                               sharded=True).rank_choice, reference.argmax(dim=-1))
        # A text whose scores are no numbers gets an index, and the others their own choice.
        broken = hidden.clone()
        broken[1] = float("nan")
        chosen = scoring.rank_candidates(model, (broken,), batch["attention_mask"], candidates)
        assert chosen.shape == (3,) and chosen[[0, 2]].tolist() == reference.argmax(dim=-1)[[0, 2]].tolist()
        monkeypatch.setattr(scoring, "RANK_CACHE_BYTES", 1)  # one example and one prefix per pass
        few = candidates[::20]
        torch.testing.assert_close(scoring.score_candidates(model, (hidden,), batch["attention_mask"], few),
                                   reference[:, ::20], atol=2e-5, rtol=0)
        # The branch and bound gives up when a level's prefixes would hold more cache than allowed: the same choice.
        assert torch.equal(scoring.rank_candidates(model, (hidden,), batch["attention_mask"], few),
                           reference[:, ::20].argmax(dim=-1))
        # The model's own loss, one text and one label at a time, for a sample of labels.
        for k in range(0, len(labels), 37):
            target = tokenizer(text_target=labels[k], return_tensors="pt").input_ids
            for i in range(len(texts)):
                loss = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                             labels=target).loss
                assert abs(-loss.item() - got[i, k].item()) < 2e-5, (labels[k], i)


def test_every_decoder_gets_the_straightforward_scores(tokenizer):
    """mBART starts each label with its own last token (the tree then starts from that shared token), and FSMT's
    decoder steps from a cache do not match a whole sequence (it is scored the straightforward way): the scores are
    those of `score_sequences` either way."""
    import torch
    import transformers

    from ia3_trainer.modeling import scoring

    tiny = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=32, decoder_ffn_dim=24, max_position_embeddings=64, dropout=0.0, pad_token_id=0,
                eos_token_id=1, bos_token_id=2, decoder_start_token_id=0)
    configs = [transformers.MBartConfig(vocab_size=512, **tiny),
               transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=512, tgt_vocab_size=512, init_std=0.3,
                                       **tiny)]
    labels = ["positive", "negative", "neutral", "sales rose", "sales", "a b c", "c1", "c12", "c123", "x"]
    candidates = scoring.candidate_label_ids(tokenizer, labels)
    batch = tokenizer(["Sales rose by 12 % .", "Profit fell ."], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    for config in configs:
        model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
        with torch.no_grad():
            hidden = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            expected = scoring.score_sequences(model, hidden, batch["attention_mask"], candidates)
            got = scoring.score_candidates(model, (hidden,), batch["attention_mask"], candidates)
            chosen = scoring.rank_candidates(model, (hidden,), batch["attention_mask"], candidates)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0, msg=config.model_type)
        assert torch.equal(chosen, expected.argmax(dim=-1)), config.model_type
