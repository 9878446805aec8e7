"""Resuming continues a run exactly as it was (issue 19): on the data it trained on (a fingerprint in run.json), to
its max_steps and not one step past, and from the newest checkpoint that reads whole."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ia3_trainer import RecipeError
from ia3_trainer.cli.main import main
from ia3_trainer.data.fingerprint import METHOD, check_same_data

from conftest import TINY_ASSETS, assert_same_adapter, tiny_recipe


RUN = {
    "data.validation_size": 0, "data.label_names": None, "data.max_train_samples": 32,
    "training.max_steps": 4, "training.per_device_train_batch_size": 4, "training.save_strategy": "steps",
    "training.save_steps": 2, "training.save_total_limit": None, "training.seed": 42, "training.disable_tqdm": True,
    "training.lr_scheduler_type": "constant",
}


def write_recipe(tmp_path, name, **overrides):
    """A recipe training into tmp_path/name on its own copy of the tiny data (tmp_path/name.jsonl)."""
    data = tmp_path / f"{name}.jsonl"
    if not data.exists():
        shutil.copy(TINY_ASSETS / "tiny-sentiment.jsonl", data)
    raw = tiny_recipe(tmp_path, **{**RUN, "data.data_files": {"train": str(data)}, **overrides})
    raw["training"]["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return str(path), data


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def edit_rows(path, change):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(row)) + "\n" for row in rows))


def test_run_json_records_the_data_and_resume_refuses_renamed_labels(tmp_path, capsys):
    recipe, data = write_recipe(tmp_path, "run")
    assert main(["train", recipe]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["data"]["labels"] == ["negative", "neutral", "positive"] and len(record["data"]["train"]) == 64

    edit_rows(data, lambda row: {**row, "label": {"negative": "bad"}.get(row["label"], row["label"])})
    line = refused(capsys, ["train", recipe, "--resume", "--set", "training.max_steps=6"])
    assert line == (
        f"ia3-trainer: error: data.data_files train ({data}): the label set changed since the checkpoint in "
        f"{tmp_path / 'run'} ([\"negative\", \"neutral\", \"positive\"] -> [\"bad\", \"neutral\", \"positive\"]); "
        f"resuming would train on other data than the steps before it: restore the data the run of {tmp_path / 'run'} "
        "trained on, or pass --overwrite to start over (train into a new training.output_dir to keep that run)")
    assert not (tmp_path / "run" / "checkpoint-6").exists()


def test_resume_refuses_edited_texts_and_goes_on_once_the_data_is_restored(tmp_path, capsys):
    recipe, data = write_recipe(tmp_path, "run")
    assert main(["train", recipe]) == 0
    original = data.read_text()
    edit_rows(data, lambda row: {**row, "sentence": row["sentence"].upper()})
    line = refused(capsys, ["train", recipe, "--resume", "--set", "training.max_steps=6"])
    assert line.startswith(f"ia3-trainer: error: data.data_files train ({data}): the training data changed since the "
                           f"checkpoint in {tmp_path / 'run'}; ")

    data.write_text(original)
    assert main(["train", recipe, "--resume", "--set", "training.max_steps=6"]) == 0
    assert json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_the_validation_split_may_change_only_with_max_eval_samples(tmp_path):
    saved = {"method": METHOD, "train": "t", "validation": "v", "labels": ["a"], "max_eval_samples": None}
    recipe = {"data": {"path": "json", "data_files": {"train": "t.jsonl", "validation": "v.jsonl"},
                       "validation_split": "validation"}}
    with pytest.raises(RecipeError, match=r"^data.data_files validation \(v.jsonl\): the validation data changed"):
        check_same_data(saved, {**saved, "validation": "w"}, recipe, tmp_path)
    check_same_data(saved, {**saved, "validation": "w", "max_eval_samples": 8}, recipe, tmp_path)  # cut: may change
    check_same_data(saved, {**saved, "method": "other", "train": "u"}, recipe, tmp_path)  # hashed another way
    with pytest.raises(RecipeError, match=r"^data.data_files train \(t.jsonl\): the label set changed"):
        check_same_data(saved, {**saved, "method": "other", "labels": ["b"]}, recipe, tmp_path)
    hub = {"data": {"path": "takala/financial_phrasebank", "train_split": "train"}}
    with pytest.raises(RecipeError, match=r"^data.path 'takala/financial_phrasebank' split 'train': the training"):
        check_same_data(saved, {**saved, "train": "u"}, hub, tmp_path)


# --- exact resume -------------------------------------------------------------------------------------------------

def global_step(folder):
    return json.loads((folder / "trainer_state.json").read_text())["global_step"]


def test_kill_during_the_final_save_resumes_to_the_uninterrupted_adapter(tmp_path, capsys):
    # 32 examples in batches of 4: 8 steps an epoch, so max_steps 6 ends mid-epoch, where transformers 5.24 would
    # train a 7th step on resume.
    steps = {"training.max_steps": 6}
    whole, _ = write_recipe(tmp_path, "whole", **steps)
    killed, _ = write_recipe(tmp_path, "killed", **steps)
    assert main(["train", whole]) == 0
    assert main(["train", killed]) == 0
    out = tmp_path / "killed"
    for name in ("adapter_model.safetensors", "adapter_config.json", "inference.json", "recipe.json", "README.md",
                 "all_results.json", "trainer_state.json"):
        (out / name).unlink(missing_ok=True)  # what a kill during the final save (staged, never published) leaves
    capsys.readouterr()

    assert main(["train", killed, "--resume"]) == 0
    assert global_step(out) == 6 and not (out / "checkpoint-7").exists()
    assert_same_adapter(load_file(out / "adapter_model.safetensors"),
                        load_file(tmp_path / "whole" / "adapter_model.safetensors"))
    assert json.loads((out / "inference.json").read_text())["label_names"] == ["negative", "neutral", "positive"]
    assert "training step" not in capsys.readouterr().err


def test_resume_with_max_steps_below_the_checkpoint_is_refused(tmp_path, capsys):
    recipe, _ = write_recipe(tmp_path, "run")
    assert main(["train", recipe]) == 0
    before = load_file(tmp_path / "run" / "adapter_model.safetensors")
    line = refused(capsys, ["train", recipe, "--resume", "--set", "training.max_steps=3"])
    assert line == (
        f"ia3-trainer: error: training.max_steps: the checkpoint {tmp_path / 'run' / 'checkpoint-4'} is at step 4, "
        "past training.max_steps 3; set training.max_steps to 4 or more to continue the run, or pass --overwrite "
        "to start over")
    line = refused(capsys, ["train", recipe, "--resume", "--set", "training.max_steps=-1", "--set",
                            "training.num_train_epochs=0.25"])  # 8 steps an epoch: 2 steps
    assert line.startswith(f"ia3-trainer: error: training.num_train_epochs: the checkpoint "
                           f"{tmp_path / 'run' / 'checkpoint-4'} is at step 4, past the 2 steps of "
                           "training.num_train_epochs; raise training.num_train_epochs to continue the run")
    after = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- checkpoints whose files are damaged ---------------------------------------------------------------------------

def corrupt(path):
    """Flip bytes in the middle of `path`, keeping its size (a disk that damaged it, not one that cut it)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage", [
    ("optimizer.pt", corrupt),
    ("rng_state.pth", corrupt),
    ("trainer_state.json", lambda path: path.write_text(json.dumps(
        {**json.loads(path.read_text()), "global_step": "four", "log_history": {}}))),
])
def test_a_checkpoint_with_a_damaged_file_is_skipped_for_the_one_before(tmp_path, caplog, name, damage):
    recipe, _ = write_recipe(tmp_path, "run")
    assert main(["train", recipe]) == 0
    out = tmp_path / "run"
    damage(out / "checkpoint-4" / name)
    with caplog.at_level(logging.INFO, logger="ia3_trainer"):
        assert main(["train", recipe, "--resume", "--set", "training.max_steps=6"]) == 0
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping")]
    assert len(skipped) == 1 and skipped[0].startswith(f"Skipping {out / 'checkpoint-4'}: its {name} ")
    assert "Resuming from " + str(out / "checkpoint-2") in [r.getMessage() for r in caplog.records]
    assert global_step(out / "checkpoint-6") == 6
    assert os.path.isfile(out / "adapter_model.safetensors")


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------

def test_ctrl_c_during_the_end_of_run_report_says_the_run_is_complete(tmp_path, capsys, monkeypatch):
    import ia3_trainer.training.lifecycle

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("IA3_TRAINER_DEBUG", raising=False)
    monkeypatch.setattr(ia3_trainer.training.lifecycle, "write_results", interrupted)
    recipe, _ = write_recipe(tmp_path, "run")
    assert main(["train", recipe]) == 130
    out = tmp_path / "run"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ia3-trainer: interrupted after the run completed (the adapter is saved in {out}); there is nothing to "
        f"resume; its results and report may be incomplete (ia3-trainer evaluate {out} writes the report)")
    assert (out / "adapter_model.safetensors").is_file()


def test_ctrl_c_while_the_cli_starts_is_one_line(capsys, monkeypatch):
    import ia3_trainer.recipe.training_args

    def interrupted():
        raise KeyboardInterrupt  # where the start-up imports datasets, huggingface_hub and transformers

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("IA3_TRAINER_DEBUG", raising=False)
    monkeypatch.setattr(ia3_trainer.recipe.training_args, "stderr_is_terminal", interrupted)
    assert main(["train", "tiny"]) == 130
    assert capsys.readouterr().err == "ia3-trainer: interrupted\n"
