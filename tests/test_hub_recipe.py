"""Pushing from a recipe (`hub.repo_id`) and with `ia3-trainer push`, against the fake Hub on 127.0.0.1."""

import json

import pytest
from transformers import Seq2SeqTrainingArguments

from ia3_trainer import IA3Seq2SeqTrainer, PushAdapterToHubCallback
from ia3_trainer.cli import main

from conftest import tiny_recipe
from hub_server import FAKE_TOKEN, HubServer, closed_endpoint, use_hub


REPO_ID = "alice/tiny-ia3"


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        use_hub(monkeypatch, server.endpoint, as_default=True)
        yield server


def test_recipe_with_hub_repo_id_pushes_the_adapter(hub, tmp_path):
    raw = tiny_recipe(tmp_path, **{"hub.repo_id": REPO_ID, "training.max_steps": 3})
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    assert any(isinstance(cb, PushAdapterToHubCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    commits = [c for c in hub.commits if c["repo_id"] == REPO_ID]
    assert commits and commits[-1]["message"] == "Upload final adapter (step 3)"
    files = hub.repo_files(REPO_ID)
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.json", "metrics.json", "README.md",
            "tokenizer.json"} <= set(files)
    assert not any(name.startswith("base-model") or name.endswith(("model.safetensors.index.json", ".bin"))
                   for name in files if name != "adapter_model.safetensors")
    for content in files.values():
        assert FAKE_TOKEN.encode() not in content
    assert json.loads(files["recipe.json"])["hub"]["repo_id"] == REPO_ID
    # The final push is the folder the trainer saved after training (every process takes part in that save).
    out = tmp_path / "out"
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert files["adapter_config.json"] == (out / "adapter_config.json").read_bytes()


def test_cli_push_of_a_finished_run(hub, tmp_path, capsys):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1}))
    trainer.train()
    out = tmp_path / "out"
    (out / "all_results.json").write_text(json.dumps({"eval_label_accuracy": 0.5}))
    assert main(["push", str(out), REPO_ID]) == 0
    assert f"Pushed {out} to " in capsys.readouterr().out
    files = hub.repo_files(REPO_ID)
    assert b"library_name: peft" in files["README.md"] and b"AutoPeftModelForSeq2SeqLM" in files["README.md"]
    assert "recipe.json" in files and "base-model/model.safetensors" not in files


def test_cli_push_with_the_hub_down_exits_2_and_keeps_the_adapter(tmp_path, monkeypatch, capsys):
    use_hub(monkeypatch, closed_endpoint(), as_default=True)
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1}))
    trainer.train()
    out = tmp_path / "out"
    capsys.readouterr()  # drop the training progress bars
    with pytest.raises(SystemExit) as info:
        main(["push", str(out), REPO_ID])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ia3-trainer: error: REPO_ID: could not push {out} to {REPO_ID}: ")
    assert "run the same command again" in err and err.count("\n") == 1
    assert (out / "adapter_model.safetensors").is_file()


def test_cli_push_needs_an_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["push", str(tmp_path), REPO_ID])
    assert info.value.code == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


def test_trainer_push_and_callback_together_is_refused(tiny_t5, tokenizer, tmp_path):
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id=REPO_ID, use_cpu=True)
    with pytest.raises(ValueError, match="push_to_hub=True together with a PushAdapterToHubCallback"):
        IA3Seq2SeqTrainer(tiny_t5, args, processing_class=tokenizer, callbacks=[PushAdapterToHubCallback(REPO_ID)])
