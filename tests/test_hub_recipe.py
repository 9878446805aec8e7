"""Pushing from a recipe (`hub.repo_id`) and with `ia3-trainer push`, against the fake Hub on 127.0.0.1."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
from transformers import Seq2SeqTrainingArguments

from ia3_trainer import IA3Seq2SeqTrainer, PushAdapterToHubCallback, RecipeError
from ia3_trainer.cli.main import main

from conftest import tiny_recipe
from hub_server import FAKE_TOKEN, HubServer, closed_endpoint, use_hub


REPO_ID = "alice/tiny-ia3"


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        use_hub(monkeypatch, server.endpoint, as_default=True)
        yield server


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished run of the tiny recipe (1 step), trained once for the module: its output_dir."""
    folder = tmp_path_factory.mktemp("trained-run")
    IA3Seq2SeqTrainer.from_recipe(tiny_recipe(folder, **{"training.max_steps": 1})).train()
    out = folder / "out"
    (out / "all_results.json").write_text(json.dumps({"eval_label_accuracy": 0.5}))
    return out


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of `trained_run` of this test's own, to push, damage or compare."""
    return Path(shutil.copytree(trained_run, tmp_path / "out"))


def snapshot(folder) -> dict:
    """Every file under `folder` with its content hash and modification time: what "left unchanged" compares."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def hub_callback(trainer) -> PushAdapterToHubCallback:
    [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PushAdapterToHubCallback)]
    return callback


def test_recipe_with_hub_repo_id_pushes_the_adapter(hub, tmp_path, staging_root):
    raw = tiny_recipe(tmp_path, **{"hub.repo_id": REPO_ID, "training.max_steps": 3})
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    callback = hub_callback(trainer)
    trainer.train()
    assert callback.wait(timeout=60) and callback.failures == []
    commits = [c for c in hub.commits if c["repo_id"] == REPO_ID]
    assert commits and commits[-1]["message"] == "Upload final adapter (step 3)"
    files = hub.repo_files(REPO_ID)
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.json", "inference.json", "metrics.json",
            "README.md", "tokenizer.json"} <= set(files)
    assert not any(name.startswith("base-model") or name.endswith(("model.safetensors.index.json", ".bin"))
                   for name in files if name != "adapter_model.safetensors")
    for content in files.values():
        assert FAKE_TOKEN.encode() not in content
    assert json.loads(files["recipe.json"])["hub"]["repo_id"] == REPO_ID
    # The final push is the folder the trainer saved after training (every process takes part in that save).
    out = tmp_path / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "inference.json"):
        assert files[name] == (out / name).read_bytes()
    # One card, ours: the trainer replaced peft's generic README.md in the run folder, and that card is the one pushed.
    assert files["README.md"] == (out / "README.md").read_bytes()
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.tags == ["peft", "ia3", "ia3-trainer", "text2text-generation"]  # with the trainer's _tag_names
    assert f"# {REPO_ID}" in card.text and "1,280" in card.text and "| train_loss |" in card.text
    assert "Model Card for Model ID" not in card.text
    assert not (out / "metrics.json").exists()  # metrics.json exists in the staging copy only
    assert list(staging_root.iterdir()) == []


def test_epoch_strategy_through_a_recipe_pushes_each_epochs_checkpoint(hub, tmp_path, staging_root):
    raw = tiny_recipe(tmp_path, **{"hub.repo_id": REPO_ID, "hub.strategy": "epoch", "training.max_steps": -1,
                                   "training.num_train_epochs": 2, "training.save_strategy": "epoch",
                                   "data.max_train_samples": 16})
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    callback = hub_callback(trainer)
    assert callback.strategy == "epoch"
    trainer.train()
    assert callback.wait(timeout=60) and callback.failures == []

    assert [c["message"] for c in hub.commits] == [
        "Upload adapter at epoch 1 (step 2)", "Upload adapter at epoch 2 (step 4)", "Upload final adapter (step 4)",
    ]
    # Each epoch's push is the checkpoint the trainer saved at that step, whole: recipe and inference settings too.
    first = hub.commits[0]["files"]
    assert {"adapter_model.safetensors", "recipe.json", "inference.json", "README.md", "metrics.json"} <= set(first)
    assert json.loads(first["metrics.json"])["global_step"] == 2
    assert json.loads(first["inference.json"])["label_names"] == ["negative", "neutral", "positive"]
    # The checkpoints keep only what the trainer wrote (the push wrote its metrics.json into the staging copy).
    assert not any((checkpoint / "metrics.json").exists() for checkpoint in (tmp_path / "out").glob("checkpoint-*"))
    assert list(staging_root.iterdir()) == []


def test_cli_train_prints_the_commit_of_the_final_push(hub, tmp_path, capsys, staging_root):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(tiny_recipe(tmp_path, **{"hub.repo_id": REPO_ID, "training.max_steps": 2})))
    assert main(["train", str(path)]) == 0
    [final] = [c for c in hub.commits if c["message"] == "Upload final adapter (step 2)"]
    assert f"Pushed the adapter to {hub.endpoint}/{REPO_ID}/commit/{final['oid']}" in capsys.readouterr().out
    assert list(staging_root.iterdir()) == []


def test_cli_push_of_a_finished_run_leaves_the_folder_as_it_was(hub, run, capsys, staging_root):
    # The card and metrics.json go to a staging copy: nothing in the run folder is written, even its mtimes.
    (run / "README.md").write_text("# a stale card of an earlier push\n")
    (run / "metrics.json").write_text('{"metrics": {"from": "an earlier run"}}\n')
    before = snapshot(run)
    assert main(["push", str(run), REPO_ID]) == 0
    assert snapshot(run) == before
    assert list(staging_root.iterdir()) == []
    out = capsys.readouterr().out
    assert f"Pushed {run} to {hub.endpoint}/{REPO_ID}/commit/{hub.commits[-1]['oid']}" in out
    files = hub.repo_files(REPO_ID)
    assert b"library_name: peft" in files["README.md"] and b"AutoPeftModelForSeq2SeqLM" in files["README.md"]
    assert f'from_pretrained("{REPO_ID}")'.encode() in files["README.md"] and b"stale" not in files["README.md"]
    assert json.loads(files["metrics.json"]) == {"metrics": {"eval_label_accuracy": 0.5}}
    assert "recipe.json" in files and "inference.json" in files and "base-model/model.safetensors" not in files


def test_cli_push_with_the_hub_down_exits_2_and_keeps_the_folder(run, monkeypatch, capsys, staging_root):
    use_hub(monkeypatch, closed_endpoint(), as_default=True)
    before = snapshot(run)
    capsys.readouterr()  # drop the training progress bars
    with pytest.raises(SystemExit) as info:
        main(["push", str(run), REPO_ID])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ia3-trainer: error: could not push {run} to {REPO_ID}: ConnectError: ")
    assert "run the same command again" in err and err.count("\n") == 1
    assert snapshot(run) == before
    assert list(staging_root.iterdir()) == []


@pytest.mark.parametrize("value", ["abc", "0"])
def test_cli_push_with_a_bad_timeout_variable_says_so_before_any_request(hub, run, monkeypatch, capsys, value):
    # It was caught with the network's errors and printed as "check the network".
    monkeypatch.setenv("IA3_TRAINER_HUB_TIMEOUT", value)
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["push", str(run), REPO_ID])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ia3-trainer: error: IA3_TRAINER_HUB_TIMEOUT: expected a number of seconds")
    assert value in err and "network" not in err and err.count("\n") == 1
    assert hub.requests == [] and snapshot(run) == before


def test_cli_push_of_a_malformed_repo_id_is_refused_before_any_request(hub, run, capsys):
    before = snapshot(run)
    with pytest.raises(SystemExit) as info:
        main(["push", str(run), "alice/bad--name"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("ia3-trainer: error: REPO_ID: ")
    assert hub.requests == [] and snapshot(run) == before


def test_cli_push_reports_the_hubs_400_without_the_token(hub, run, capsys, staging_root):
    """A 400 is the Hub's refusal, not a bad repo id; its message echoes the Authorization header: redacted."""
    before = snapshot(run)
    capsys.readouterr()
    hub.fail_next(1, status=400, echo_headers=True)
    with pytest.raises(SystemExit) as info:
        main(["push", str(run), REPO_ID])
    assert info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(f"ia3-trainer: error: could not push {run} to {REPO_ID}: HTTP 400 for POST ")
    assert "Authorization: Bearer ***" in err and "REPO_ID" not in err and err.count("\n") == 1
    assert FAKE_TOKEN not in captured.out + err
    assert snapshot(run) == before
    assert list(staging_root.iterdir()) == []


def test_cli_push_in_offline_mode_fails_at_once(hub, run, monkeypatch, capsys, staging_root):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["push", str(run), REPO_ID])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"ia3-trainer: error: could not push {run} to {REPO_ID}: HF_HUB_OFFLINE is set, so nothing may reach the Hub; "
        f"unset HF_HUB_OFFLINE (or set it to 0) and run the same command again (nothing in {run} was changed)\n"
    )
    assert hub.requests == []
    assert list(staging_root.iterdir()) == []


def test_cli_push_to_a_hub_that_never_answers_ends_in_bounded_time(hub, run, monkeypatch, capsys, staging_root):
    hub.hang = True
    monkeypatch.setenv("IA3_TRAINER_HUB_TIMEOUT", "1")
    before = snapshot(run)
    capsys.readouterr()
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["push", str(run), REPO_ID])
    assert time.monotonic() - start < 30
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ia3-trainer: error: could not push {run} to {REPO_ID}: the Hub did not answer within 1 s")
    assert err.count("\n") == 1
    assert snapshot(run) == before
    assert list(staging_root.iterdir()) == []


def test_cli_train_writes_its_results_then_waits_a_bounded_time_for_the_push(hub, tmp_path, monkeypatch, capsys):
    # The repo is created and no upload ever ends. Training starts once the repo is created, whatever the machine's
    # speed: what the wait lists is decided here, not by a race between training and the 0.4 s request timeout.
    hub.hang = "/preupload/"
    monkeypatch.setenv("IA3_TRAINER_HUB_TIMEOUT", "0.4")
    begin = PushAdapterToHubCallback.on_train_begin

    def on_train_begin(self, *args, **kwargs):
        begin(self, *args, **kwargs)
        assert self.wait(timeout=60) and self.pending == []

    monkeypatch.setattr(PushAdapterToHubCallback, "on_train_begin", on_train_begin)
    raw = tiny_recipe(tmp_path, **{"hub.repo_id": REPO_ID, "training.max_steps": -1, "training.eval_strategy": "epoch",
                                   "data.max_train_samples": 16})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    assert main(["train", str(path)]) == 0  # the wait is bounded: 5 request timeouts, 2 s (the line below)

    out = tmp_path / "out"
    assert (out / "all_results.json").is_file() and (out / "eval_report.json").is_file()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    waiting = next(i for i, line in enumerate(lines) if line.startswith("ia3-trainer: waiting up to 2 s"))
    assert lines[waiting] == (f"ia3-trainer: waiting up to 2 s for Hub repo {REPO_ID}: Upload final adapter (step 2) "
                              "(Ctrl-C stops waiting)")
    assert REPO_ID in hub.repos
    assert any(line.startswith("report: ") for line in lines[:waiting])  # the results came first
    stopped = [line for line in captured.err.splitlines() if line.startswith("ia3-trainer: ")]
    assert len(stopped) == 1 and stopped[0].startswith(f"ia3-trainer: Stopped waiting after 2 s: 1 push(es) to Hub "
                                                       f"repo {REPO_ID} did not finish")
    assert stopped[0].endswith(f"push it later with: ia3-trainer push {out} {REPO_ID}")


def _launch(command, hub, tmp_path, timeout_s: str):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "0", "IA3_TRAINER_HUB_TIMEOUT": timeout_s, "TMPDIR": str(tmp_path / "tmp"),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ia3_trainer", *command], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _interrupt(process) -> tuple[float, str]:
    """Ctrl-C `process`: the seconds it took to exit, and its stderr."""
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = process.communicate(timeout=60)
    return time.monotonic() - start, err


@pytest.mark.slow
def test_ctrl_c_while_train_waits_for_the_push_exits_at_once_with_one_line(tmp_path):
    with HubServer() as hub:
        hub.hang = True
        raw = tiny_recipe(tmp_path, **{"hub.repo_id": REPO_ID, "data.max_train_samples": 16, "training.max_steps": -1,
                                       "training.disable_tqdm": True})
        (tmp_path / "recipe.json").write_text(json.dumps(raw))
        process = _launch(["train", str(tmp_path / "recipe.json")], hub, tmp_path, "60")
        try:
            for line in process.stdout:  # the wait starts once the results are written
                if line.startswith("ia3-trainer: waiting up to 300 s"):
                    break
            seconds, err = _interrupt(process)
        finally:
            process.kill()
    assert seconds < 10
    assert process.returncode == 130
    lines = [line for line in err.splitlines() if line.startswith("ia3-trainer: ")]
    out = tmp_path / "out"
    assert lines == [f"ia3-trainer: Interrupted: 1 push(es) to Hub repo {REPO_ID} did not finish (Upload final "
                     f"adapter (step 2)). The adapter is saved in {out}; push it later with: ia3-trainer push {out} "
                     f"{REPO_ID}"]
    assert "Traceback" not in err
    assert (tmp_path / "out" / "all_results.json").is_file()
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_during_cli_push_exits_at_once_and_removes_its_staging_copy(run, tmp_path):
    before = snapshot(run)
    with HubServer() as hub:
        hub.hang = True
        process = _launch(["push", str(run), REPO_ID], hub, tmp_path, "60")
        try:
            deadline = time.monotonic() + 60
            while not hub.requests and time.monotonic() < deadline:  # the push is under way: the Hub got a request
                time.sleep(0.1)
            assert list((tmp_path / "tmp").iterdir()) != []  # its staging copy
            seconds, err = _interrupt(process)
        finally:
            process.kill()
    assert seconds < 10
    assert process.returncode == 130
    assert err == (f"ia3-trainer: interrupted: the push to {REPO_ID} did not finish; {run} is unchanged; run the same "
                   "command again to push it\n")
    assert snapshot(run) == before
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cli_push_needs_an_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["push", str(tmp_path), REPO_ID])
    assert info.value.code == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


def test_trainer_push_and_callback_together_is_refused(tiny_t5, tokenizer, tmp_path):
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id=REPO_ID, use_cpu=True)
    with pytest.raises(RecipeError, match="training.push_to_hub: is true together with a PushAdapterToHubCallback"):
        IA3Seq2SeqTrainer(tiny_t5, args, processing_class=tokenizer, callbacks=[PushAdapterToHubCallback(REPO_ID)])
