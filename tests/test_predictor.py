"""IA3Predictor, `ia3-trainer predict` and `ia3-trainer merge` on tiny adapters trained once per module."""

import json
import logging

import pytest
import torch
from peft.tuners.ia3 import IA3Layer
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MT5ForConditionalGeneration

from ia3_trainer import HubError, IA3Seq2SeqTrainer, PathError, RecipeError, load_recipe
from ia3_trainer.cli.main import main
from ia3_trainer.data.encoding import encode_batch
from ia3_trainer.data.labels import label_texts
from ia3_trainer.data.splits import load_splits
from ia3_trainer.evaluation.metrics import decode
from ia3_trainer.inference.merging import merge_adapter
from ia3_trainer.inference.predictor import IA3Predictor
from ia3_trainer.recipe.sections import MAX_TOKENS

from conftest import TINY_MODEL_DIR, tiny_config, tiny_recipe


def train_adapter(folder, base_dir, **overrides):
    """Train 20 steps on the tiny data; return the output dir, its eval texts, and the predictions made by the
    trained model right after training (one text at a time, no padding)."""
    # fp32 throughout: bf16 autocast (on by default on CPUs with AMX) would make "right after training" differ in
    # the last digits from the reloaded fp32 model, which is not what this compares.
    raw = tiny_recipe(folder, **{"training.max_steps": 20, "model.name_or_path": str(base_dir),
                                 "model.init": "pretrained", "training.bf16": False, **overrides})
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    trainer.train()
    recipe = load_recipe(raw)
    train, validation = load_splits(recipe.data)
    _, validation, _ = label_texts(train, validation, recipe.data)
    texts = validation[recipe.data.text_column][:12]
    model, tokenizer = trainer.model.eval(), trainer.processing_class
    expected = []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer([recipe.data.source_prefix + text], return_tensors="pt")
            expected += decode(model.generate(**inputs, max_new_tokens=trainer.max_new_tokens).numpy(), tokenizer)
    return folder / "out", texts, expected, trainer.max_new_tokens


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory, tiny_t5_dir):
    return train_adapter(tmp_path_factory.mktemp("sentiment"), tiny_t5_dir, **{"data.source_prefix": "sentiment: "})


@pytest.fixture(scope="module")
def mood(tmp_path_factory, tiny_t5_dir):
    """A second task on the same base: the same sentences labelled bad / meh / good (3 tokens each)."""
    folder = tmp_path_factory.mktemp("mood")
    names = {"negative": "bad", "neutral": "meh", "positive": "good"}
    lines = (TINY_MODEL_DIR.parent / "tiny-sentiment.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    data = folder / "mood.jsonl"
    data.write_text("".join(json.dumps({**row, "label": names[row["label"]]}) + "\n" for row in rows))
    overrides = {"data.source_prefix": "mood: ", "data.data_files": {"train": str(data)},
                 "data.label_names": ["bad", "meh", "good"]}
    return train_adapter(folder, tiny_t5_dir, **overrides)


def test_predictions_equal_those_made_right_after_training(sentiment):
    out, texts, expected, max_new_tokens = sentiment
    predictor = IA3Predictor.from_pretrained(out)
    assert predictor.settings.source_prefix == "sentiment: "  # read from recipe.json
    assert predictor.settings.max_new_tokens == max_new_tokens == 2
    assert predictor.predict(texts, batch_size=5) == expected
    assert predictor.predict(texts[0]) == expected[:1]
    assert set(expected) & {"negative", "neutral", "positive"}, "training taught nothing; the comparison is empty"


def test_two_adapters_share_one_base_and_switch(sentiment, mood):
    out_a, texts, expected_a, _ = sentiment
    out_b, _, _, _ = mood
    predictor = IA3Predictor.from_pretrained(out_a)
    base = predictor.model.get_base_model()
    predictor.load_adapter(out_b, "mood")
    assert predictor.adapters == ["default", "mood"] and predictor.active_adapter == "default"

    predictor.set_adapter("mood")
    assert predictor.settings.source_prefix == "mood: " and predictor.settings.max_new_tokens == 3
    on_mood = predictor.predict(texts)
    assert on_mood == IA3Predictor.from_pretrained(out_b).predict(texts)
    assert on_mood != expected_a
    predictor.set_adapter("default")
    assert predictor.predict(texts) == expected_a
    assert predictor.model.get_base_model() is base, "switching reloaded the base model"

    with pytest.raises(ValueError, match=r"no adapter named 'sst2'; loaded adapters: \['default', 'mood'\]"):
        predictor.set_adapter("sst2")
    with pytest.raises(ValueError, match="adapter name 'mood' is already loaded"):
        predictor.load_adapter(out_b, "mood")


def test_bad_inputs_are_one_line_errors(sentiment, tmp_path, monkeypatch):
    out, _, _, _ = sentiment
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: holds no adapter \(no adapter_config.json\); pass the training"):
        IA3Predictor.from_pretrained(tmp_path / "empty")
    checkpoint = tmp_path / "run" / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="run: holds no adapter .*its latest checkpoint .*checkpoint-7 has one"):
        IA3Predictor.from_pretrained(tmp_path / "run")

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    expected = r"^someone/no-such-adapter: no such local folder, and no Hub repo of that id could be loaded \(HF_HUB"
    with pytest.raises(HubError, match=expected + "_OFFLINE is set\\)"):
        IA3Predictor.from_pretrained("someone/no-such-adapter")

    predictor = IA3Predictor.from_pretrained(out)
    # Misuse of the Python API is a TypeError/ValueError in Python terms, not a recipe problem.
    with pytest.raises(ValueError, match="text 2: is empty; give each text something to classify") as info:
        predictor.predict(["fine", "  "])
    assert not isinstance(info.value, RecipeError)
    with pytest.raises(TypeError, match="text 1: must be a string, got int"):
        predictor.predict([3])
    with pytest.raises(ValueError, match="batch_size: must be >= 1, got 0"):
        predictor.predict(["fine"], batch_size=0)


def test_long_text_is_truncated_with_one_warning(sentiment, caplog):
    out, texts, _, _ = sentiment
    predictor = IA3Predictor.from_pretrained(out)
    long = " ".join(texts) * 3
    tokenizer = predictor.tokenizer
    assert len(tokenizer("sentiment: " + long)["input_ids"]) > 64
    with caplog.at_level(logging.WARNING, logger="ia3_trainer.inference.predictor"):
        first = predictor.predict([long, texts[0]])
        predictor.predict([long])
    warnings = [r for r in caplog.records if "source limit" in r.getMessage()]
    assert len(warnings) == 1
    assert "1 of 2 texts are longer than the 64-token source limit" in warnings[0].getMessage()
    # The prediction is that of the first 64 tokens.
    ids = tokenizer(["sentiment: " + long], max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        truncated = predictor.model.generate(**ids, max_new_tokens=predictor.settings.max_new_tokens)
    assert first[0] == decode(truncated.numpy(), tokenizer)[0]


def test_cli_predict_texts_file_and_jsonl(sentiment, tmp_path, capsys):
    out, texts, expected, _ = sentiment
    assert main(["predict", str(out), texts[0], texts[1]]) == 0
    captured = capsys.readouterr()
    printed = [json.loads(line) for line in captured.out.splitlines()]
    assert printed == [{"text": texts[0], "prediction": expected[0]}, {"text": texts[1], "prediction": expected[1]}]
    # A generation that is no label ("" from an undertrained adapter, say) is said so on stderr, once.
    unlabelled = sum(p.strip() not in ("negative", "neutral", "positive") for p in expected[:2])
    hint = [line for line in captured.err.splitlines() if "none of the adapter's labels" in line]
    assert hint == ([f"ia3-trainer: {unlabelled} of 2 predictions are none of the adapter's labels ['negative', "
                     "'neutral', 'positive']; train longer, or check that the texts look like its training data"]
                    if unlabelled else [])

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "sentence": text}) + "\n" for i, text in enumerate(texts)))
    assert main(["predict", str(out), "--file", str(rows), "--output", str(tmp_path / "p.jsonl"),
                 "--batch-size", "4"]) == 0
    assert f"{len(texts)} predictions written to" in capsys.readouterr().out
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert written == [{"id": i, "sentence": text, "prediction": expected[i]} for i, text in enumerate(texts)]

    plain = tmp_path / "texts.txt"
    plain.write_text("\n".join(texts[:3]) + "\n\n")
    assert main(["predict", str(out), "--file", str(plain)]) == 0
    assert [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()] == expected[:3]


@pytest.mark.parametrize("argv,message", [
    (["predict", "{out}"], "predict: no texts; give TEXT arguments or --file FILE"),
    (["predict", "{out}", ""], "text 1: is empty"),
    (["predict", "{tmp}", "some text"], "holds no adapter (no adapter_config.json)"),
    (["predict", "{tmp}/gone", "some text"], "gone: no such folder; pass a training output_dir, or a Hub repo id"),
    (["predict", "{out}", "--file", "{tmp}/missing.txt"], "--file: no such file"),
    (["evaluate", "{out}", "--data", "{tmp}/missing.csv"], "--data: no such file"),
    (["merge", "{tmp}", "{tmp}/merged"], "holds no adapter"),
])
def test_cli_bad_input_exits_2(sentiment, tmp_path, capsys, argv, message):
    out = sentiment[0]
    with pytest.raises(SystemExit) as info:
        main([arg.format(out=out, tmp=tmp_path) for arg in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ia3-trainer: error: ") and message in err and err.count("\n") == 1


def test_merge_gives_a_plain_model_with_the_same_logits(sentiment, tiny_t5_dir, tmp_path, capsys):
    out, texts, _, _ = sentiment
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    assert "merged model and tokenizer saved to" in capsys.readouterr().out
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)

    assert not any(isinstance(module, IA3Layer) for module in merged.modules())
    assert not any("ia3" in name for name, _ in merged.named_parameters())
    assert merged.num_parameters() == base.num_parameters()

    predictor = IA3Predictor.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(["sentiment: " + text for text in texts], padding=True, return_tensors="pt")
    decoder_input_ids = torch.tensor([[0, 216, 217, 218]] * len(texts))
    with torch.no_grad():
        expected = predictor.model(**batch, decoder_input_ids=decoder_input_ids).logits
        got = merged(**batch, decoder_input_ids=decoder_input_ids).logits
        unmerged_base = base(**batch, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmerged_base, expected, atol=1e-3), "the adapter changes nothing; test is empty"


def test_merge_keeps_a_separate_head_untied(tmp_path, tokenizer):
    # mt0's output head is its own tensor, but transformers 5 loads it with tie_word_embeddings: true.
    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(tiny_config("mt5"))
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(tmp_path / "mt5")
    tokenizer.save_pretrained(tmp_path / "mt5")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "mt5")
    assert loaded.config.tie_word_embeddings is True  # what the merge must not save
    adapter = IA3Seq2SeqTrainer.wrap_model_with_ia3(loaded)  # peft's mt5 default: k, v, wi_1
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "ia3_l" in name:
                parameter.uniform_(0.5, 1.5)
    adapter.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight is not merged.shared.weight
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        adapter_model = IA3Predictor.from_pretrained(tmp_path / "adapter").model
        expected = adapter_model(input_ids=ids, decoder_input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids, decoder_input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(PathError, match="^merged_dir: .* is the adapter folder itself"):
        merge_adapter(tmp_path / "adapter", tmp_path / "adapter")


class Prompted(IA3Seq2SeqTrainer):
    @classmethod
    def preprocess(cls, batch, tokenizer, data):
        batch = {**batch, data.text_column: [f"Review: {text}" for text in batch[data.text_column]]}
        return encode_batch(batch, tokenizer, data)


def test_a_text_cut_through_a_custom_preprocess_is_reported(tiny_t5, tokenizer, tmp_path, caplog):
    recipe = load_recipe(tiny_recipe(tmp_path))  # data.max_source_length: 64
    predictor = IA3Predictor(IA3Seq2SeqTrainer.wrap_model_with_ia3(tiny_t5), tokenizer, recipe=recipe,
                             encode=Prompted.preprocess)
    long = "Juniper Retail said its net sales rose by 12 % . " * 20
    with caplog.at_level(logging.WARNING, logger="ia3_trainer.inference.predictor"):
        predictor.predict(["fine", long], max_new_tokens=2)
    warnings = [r.getMessage() for r in caplog.records if "source limit" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 2 texts are longer than the 64-token source limit" in warnings[0]
    assert "e.g. text 2" in warnings[0]


def test_an_adapter_trained_with_a_custom_preprocess_merges(tmp_path, tiny_t5_dir, capsys):
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 3, "model.name_or_path": str(tiny_t5_dir),
                                   "model.init": "pretrained", "training.bf16": False})
    Prompted.from_recipe(raw).train()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="was trained with a custom preprocess"):  # predicting needs its encode
        IA3Predictor.from_pretrained(out)
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0  # merging encodes nothing
    assert "merged model and tokenizer saved to" in capsys.readouterr().out
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    predictor = IA3Predictor.from_pretrained(out, encode=Prompted.preprocess)
    batch = predictor.tokenizer(["Review: a fine quarter"], return_tensors="pt")
    with torch.no_grad():
        expected = predictor.model(**batch, decoder_input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(merged(**batch, decoder_input_ids=batch["input_ids"]).logits, expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_max_length,expected", [
    (32, 32), (MAX_TOKENS, MAX_TOKENS), (5_000_000, None), (int(1e30), None),
])
def test_without_a_recipe_the_tokenizers_own_limit_applies(tiny_t5, model_max_length, expected):
    # 5,000,000 is no real limit either (over what a data section takes): it used to fail every predict.
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR, model_max_length=model_max_length)
    predictor = IA3Predictor(IA3Seq2SeqTrainer.wrap_model_with_ia3(tiny_t5), tokenizer)
    assert predictor.settings.max_source_length == expected
    long = "Juniper Retail said its net sales rose by 12 % . " * 10
    assert len(tokenizer(long)["input_ids"]) > 32
    assert len(predictor.encode([long])[0]["input_ids"]) == min(len(tokenizer(long)["input_ids"]), model_max_length)
    assert len(predictor.predict([long, "fine"], max_new_tokens=2)) == 2
