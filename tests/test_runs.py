"""Never lose a run: a run owns its output folder, resumes only itself, saves whole or not at all, and every way it
can stop (another run, a full disk, Ctrl-C, a damaged checkpoint) ends in one line that says what to do."""

import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ia3_trainer import IA3Seq2SeqTrainer
from ia3_trainer.cli.main import main
from ia3_trainer.errors import RecipeError, RunFolderError
from ia3_trainer.layout import checkpoint_damage
from ia3_trainer.training.checkpoints import last_checkpoint
from ia3_trainer.training.resuming import recipe_changes, resumable
from ia3_trainer.training.runs import LOCK_FILE, RUN_FILE, claim_output_dir

from conftest import REPO, TINY_MODEL_DIR, free_port, signal_at_first_checkpoint, tiny_recipe


# Checkpoints at steps 2 and 4, no evaluation: a few seconds a run.
SAVES = {"training.max_steps": 4, "training.save_strategy": "steps", "training.save_steps": 2,
         "training.save_total_limit": None, "training.disable_tqdm": True, "training.bf16": False}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def write(tmp_path, raw, name="recipe.json"):
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return str(path)


def fails(argv, capsys) -> str:
    """Run the CLI, expecting exit 2; return its one stderr line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ia3-trainer: error: ") and "\n" not in err, err
    return err


def snapshot(folder: Path, skip=(RUN_FILE, LOCK_FILE)) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name not in skip}


# --- reuse ---------------------------------------------------------------------------------------------------------


def test_a_folder_holding_another_run_is_refused_and_overwrite_replaces_only_run_files(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, tiny_recipe(tmp_path, **SAVES))
    assert main(["train", path]) == 0
    first = json.loads((out / RUN_FILE).read_text())
    assert first["recipe"]["training"]["max_steps"] == 4 and first["pid"] == os.getpid()
    (out / "my-notes.txt").write_text("mine")
    before = snapshot(out)
    capsys.readouterr()

    err = fails(["train", path, "--set", "training.seed=7"], capsys)
    assert err == (
        f"ia3-trainer: error: training.output_dir: {out} holds another run (recipe 'tiny', started "
        f"{first['started']}, a final adapter, 2 checkpoints, newest checkpoint-4); pass --overwrite to replace it, "
        "pass --resume to continue it, or choose another training.output_dir")
    assert snapshot(out) == before  # nothing written, not even run.json

    assert main(["train", path, "--overwrite", "--set", "training.seed=7", "--set", "training.save_strategy=no"]) == 0
    second = json.loads((out / RUN_FILE).read_text())
    assert second["run_id"] != first["run_id"] and second["recipe"]["training"]["seed"] == 7
    assert (out / "my-notes.txt").read_text() == "mine"  # not a file a run writes: kept
    assert not list(out.glob("checkpoint-*")), "the first run's checkpoints survived --overwrite"
    assert snapshot(out)["adapter_model.safetensors"] != before["adapter_model.safetensors"]


def test_a_folder_holding_other_files_is_refused_even_with_overwrite(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8")
    path = write(tmp_path, tiny_recipe(tmp_path, **{"training.output_dir": str(folder), "training.max_steps": 1}))
    for extra in ([], ["--overwrite"]):
        err = fails(["train", path, *extra], capsys)
        assert err == (f"ia3-trainer: error: training.output_dir: {folder} holds files that are not a training "
                       "run's (holiday.jpg); a run trains into a new or empty folder and owns it: choose another "
                       "training.output_dir")
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


def test_the_python_api_follows_the_same_rules_and_records_the_run_before_training(tmp_path):
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 2})
    seen = {}

    class Record:
        def __getattr__(self, name):
            return lambda args, state, control, **kwargs: None

        def on_train_begin(self, args, state, control, **kwargs):
            seen["run"] = json.loads((Path(args.output_dir) / RUN_FILE).read_text())

    IA3Seq2SeqTrainer.from_recipe(raw, callbacks=[Record()]).train()
    assert seen["run"]["recipe"]["training"]["max_steps"] == 2
    with pytest.raises(RunFolderError, match="holds another run") as info:
        IA3Seq2SeqTrainer.from_recipe(raw).train()
    # Told in Python's words (the command line says --overwrite and --resume instead).
    assert info.value.key == "training.output_dir" and isinstance(info.value, FileExistsError)
    assert info.value.fix.startswith("set training.overwrite_output_dir to replace it")
    assert "--" not in str(info.value)
    IA3Seq2SeqTrainer.from_recipe(raw, {"training.overwrite_output_dir": True}).train()


# --- resume after an edit ------------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_recipe_naming_the_keys_and_allows_safe_changes(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, tiny_recipe(tmp_path, **SAVES))
    assert main(["train", path]) == 0
    before = snapshot(out)
    record = (out / RUN_FILE).read_text()
    capsys.readouterr()

    err = fails(["train", path, "--resume", "--set", "training.learning_rate=0.1", "--set",
                 'data.label_names=["bad","meh","good"]', "--set", "training.max_steps=6"], capsys)
    assert err == (
        f"ia3-trainer: error: training.output_dir: resuming continues the run of {out}, whose recipe differs in "
        'data.label_names (["negative", "neutral", "positive"] -> ["bad", "meh", "good"]), training.learning_rate '
        "(0.3 -> 0.1); resuming would mix two recipes: undo those changes, or train into a new training.output_dir "
        "(on resume only the length of the run, logging, evaluation, saving, hub and speed settings may change)")
    assert snapshot(out) == before and (out / RUN_FILE).read_text() == record  # refused before writing anything

    assert main(["train", path, "--resume", "--set", "training.max_steps=6", "--set", "training.logging_steps=3"]) == 0
    out_lines = capsys.readouterr().out.splitlines()
    # Told once, though the command line checks the folder before the model loads and the run checks it again.
    assert out_lines.count(f"Resuming {out} with training.logging_steps (1 -> 3), training.max_steps (4 -> 6)") == 1
    assert f"Resuming from {out / 'checkpoint-4'}" in out_lines
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4, 6]  # new steps apply
    assert json.loads((out / "recipe.json").read_text())["training"]["max_steps"] == 6
    assert len(json.loads((out / RUN_FILE).read_text())["resumed"]) == 1
    # A run's own recipe.json names its own folder, and continues it.
    assert main(["train", str(out / "recipe.json"), "--resume", "--set", "training.max_steps=8"]) == 0
    assert f"Resuming from {out / 'checkpoint-6'}" in capsys.readouterr().out.splitlines()


def test_resume_refuses_a_precision_the_machine_resolves_differently(tmp_path, capsys, monkeypatch):
    # bf16 unset defaults by the machine: a resume where it resolves otherwise would mix fp32 and bf16 training.
    import ia3_trainer.recipe.training_args as training_args

    out = tmp_path / "out"
    raw = tiny_recipe(tmp_path, **SAVES)
    del raw["training"]["bf16"]
    path = write(tmp_path, raw)
    monkeypatch.setattr(training_args, "default_bf16", lambda *args, **kwargs: False)
    assert main(["train", path]) == 0
    assert json.loads((out / RUN_FILE).read_text())["precision"] == "fp32"
    monkeypatch.setattr(training_args, "default_bf16", lambda *args, **kwargs: True)
    capsys.readouterr()
    err = fails(["train", path, "--resume", "--set", "training.max_steps=6"], capsys)
    assert err == (
        f"ia3-trainer: error: training.bf16: the run of {out} trained in fp32 and this one would train in bf16 (an "
        "unset training.bf16 defaults by the machine and device); set training.bf16=false and training.fp16=false to "
        "continue it in fp32, or train into a new training.output_dir")
    # Writing the precision the run had continues it (the written value may change, the resolved one may not).
    assert main(["train", path, "--resume", "--set", "training.max_steps=6", "--set", "training.bf16=false"]) == 0
    assert f"Resuming from {out / 'checkpoint-4'}" in capsys.readouterr().out.splitlines()


def test_precision_checks_where_the_earlier_run_recorded_none():
    # run.json from before precision was recorded, or a folder with checkpoints only: the written flags decide.
    from ia3_trainer.training.resuming import check_same_precision, run_precision

    where = Path("/runs/a")
    unset, fp32, bf16 = ({"training": {}}, {"training": {"bf16": False}}, {"training": {"bf16": True}})
    assert run_precision({"precision": "bf16"}, unset) == "bf16"
    assert run_precision({}, fp32) == "fp32" and run_precision(None, {"training": {"fp16": True}}) == "fp16"
    assert run_precision(None, unset) is None
    check_same_precision(None, "bf16", unset, unset, where)  # both unset: nothing to compare
    with pytest.raises(RecipeError, match=r"differs in training.bf16 \(unset -> true\); it would train in another"):
        check_same_precision(None, "bf16", unset, bf16, where)
    check_same_precision(run_precision(None, fp32), "fp32", fp32, unset, where)  # unset resolves to the same
    with pytest.raises(RecipeError, match="trained in fp32 and this one would train in fp16 .* set "
                                          "training.bf16=false and training.fp16=false to continue it in fp32"):
        check_same_precision(run_precision(None, fp32), "fp16", fp32, {"training": {"fp16": True}}, where)


def test_only_keys_that_do_not_change_training_may_change():
    old = {"name": "a", "training": {"learning_rate": 0.3, "max_steps": 4}, "hub": {"repo_id": None}, "ia3": {}}
    new = {"name": "b", "training": {"learning_rate": 0.3, "max_steps": 8, "seed": 42}, "hub": {"repo_id": "a/b"},
           "ia3": {"init_ia3_weights": True}}
    # seed 42 and init_ia3_weights True are the defaults the old recipe left out: no change.
    assert recipe_changes(old, new) == {"name": ("a", "b"), "training.max_steps": (4, 8), "hub.repo_id": (None, "a/b")}
    assert all(map(resumable, recipe_changes(old, new)))
    for key in ("training.learning_rate", "training.seed", "training.per_device_train_batch_size",
                "training.gradient_accumulation_steps", "training.optim", "training.lr_scheduler_type",
                "model.name_or_path", "data.label_names", "data.source_prefix", "ia3.target_modules"):
        assert not resumable(key), key


def test_every_resumable_key_is_a_recipe_key():
    from ia3_trainer.recipe.overrides import known_keys
    from ia3_trainer.training.resuming import RESUMABLE

    for key in RESUMABLE:
        section, _, field = key.partition(".")
        assert (known_keys(section) is None and not field) or field in known_keys(section), key


# --- two runs at once ----------------------------------------------------------------------------------------------


HOLD = """
import sys, time
from types import SimpleNamespace
from ia3_trainer.training.runs import claim_output_dir
with claim_output_dir(SimpleNamespace(output_dir=sys.argv[1], should_save=True, world_size=1)):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_locked_folder_names_the_running_process(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, tiny_recipe(tmp_path, **{"training.max_steps": 1}))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = fails(["train", path], capsys)
        since = json.loads((out / LOCK_FILE).read_text())["since"]
        assert err == (f"ia3-trainer: error: training.output_dir: {out} is in use by another run (pid {holder.pid} on "
                       f"{socket.gethostname()}, since {since}); wait for it to end, or choose another "
                       "training.output_dir")
        # A run claims its folder once: a second claim is refused, from the same process too.
        args = SimpleNamespace(output_dir=str(tmp_path / "mine"), should_save=True, world_size=1)
        with claim_output_dir(args), pytest.raises(RunFolderError, match=f"pid {os.getpid()} on"):
            with claim_output_dir(args):
                pass
    finally:
        holder.kill()  # no cleanup runs: the kernel releases its lock
        holder.wait()
    assert (out / LOCK_FILE).is_file()
    assert main(["train", path]) == 0  # a dead holder's lock file blocks nothing


@pytest.mark.slow
def test_every_process_of_a_launch_stops_with_the_same_line_when_the_folder_is_taken(tmp_path):
    path = write(tmp_path, tiny_recipe(tmp_path, **{"training.max_steps": 2}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.json").write_text("{}")  # another run's
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "ia3_trainer", "train", path]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1  # torchrun's code for failed processes; each exits 2
    line = f"ia3-trainer: error: training.output_dir: {out} holds another run (its files); pass --overwrite"
    assert sum(text.startswith(line) for text in result.stderr.splitlines()) == 2, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json"]


# --- folders a run must not own ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["root", "home", "recipe folder", "model folder", "parent of the data", "data"])
def test_validate_refuses_output_dirs_the_run_does_not_own(tmp_path, capsys, where):
    raw = tiny_recipe(tmp_path)
    data = tmp_path / "corpus" / "en" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text((TINY_MODEL_DIR.parent / "tiny-sentiment.jsonl").read_text())
    raw["data"]["data_files"] = {"train": str(data)}
    output_dir, problem = {
        "root": ("/", "/ is the filesystem root"),
        "home": ("~", f"{Path.home().resolve()} is the home folder"),
        "recipe folder": (str(tmp_path), f"{tmp_path} is the folder of the recipe file"),
        "model folder": (str(TINY_MODEL_DIR), f"{TINY_MODEL_DIR} is the model folder (model.name_or_path)"),
        "parent of the data": (str(tmp_path / "corpus"), f"{tmp_path / 'corpus'} holds the folder of the data files "
                               f"(data.data_files), {data.parent}"),
        "data": (str(data.parent), f"{data.parent} is the folder of the data files (data.data_files)"),
    }[where]
    raw["training"]["output_dir"] = output_dir
    path = write(tmp_path, raw)
    assert fails(["validate", path], capsys) == (
        f"ia3-trainer: error: {path}: training.output_dir: {problem}; a run owns its output folder and writes its "
        "adapter, README.md, recipe.json and checkpoints there: set training.output_dir to a new folder, e.g. "
        "outputs/tiny")


def test_an_output_dir_holding_the_model_is_blamed_on_the_override(tmp_path, capsys):
    path = write(tmp_path, tiny_recipe(tmp_path))
    err = fails(["validate", path, "--set", f"training.output_dir={TINY_MODEL_DIR.parent}"], capsys)
    assert err.startswith(f"ia3-trainer: error: --set: training.output_dir: {TINY_MODEL_DIR.parent} holds the model "
                          f"folder (model.name_or_path), {TINY_MODEL_DIR}; ")


# --- merge targets -------------------------------------------------------------------------------------------------


def test_merge_refuses_folders_it_does_not_own_and_replaces_only_an_earlier_merge(tmp_path, capsys):
    out = tmp_path / "out"  # model.init random: the base is saved in out/base-model
    assert main(["train", write(tmp_path, tiny_recipe(tmp_path, **{"training.max_steps": 2}))]) == 0
    base = snapshot(out / "base-model")
    capsys.readouterr()
    for target, problem in (
        (out / "base-model", f"{out / 'base-model'} is the adapter's base model {out / 'base-model'}"),
        (out / "base-model" / "merged", f"{out / 'base-model' / 'merged'} is inside the adapter's base model"),
        (out, f"{out} is the adapter folder itself"),
        (tmp_path, f"{tmp_path} holds the adapter folder"),
    ):
        for extra in ([], ["--overwrite"]):
            assert fails(["merge", str(out), str(target), *extra], capsys).startswith(
                f"ia3-trainer: error: MERGED_DIR: {problem}")
    assert snapshot(out / "base-model") == base

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert fails(["merge", str(out), str(mine)], capsys) == (
        f"ia3-trainer: error: MERGED_DIR: {mine} is not empty; give a new folder, or pass --overwrite to replace the "
        "model in it")
    assert "holds files that are not a saved model" in fails(["merge", str(out), str(mine), "--overwrite"], capsys)
    assert (mine / "notes.txt").read_text() == "mine"

    merged = tmp_path / "merged"
    assert main(["merge", str(out), str(merged)]) == 0
    capsys.readouterr()
    assert "is not empty" in fails(["merge", str(out), str(merged)], capsys)
    (merged / "stale.txt").write_text("from before")
    assert main(["merge", str(out), str(merged), "--overwrite"]) == 0
    assert (merged / "config.json").is_file() and not (merged / "stale.txt").exists()  # replaced whole
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert snapshot(out / "base-model") == base


def test_the_final_save_publishes_the_adapter_first_and_the_card_last(tmp_path, monkeypatch):
    import ia3_trainer.training.checkpoints as checkpoints

    published, publish = [], checkpoints.publish

    def recording(staged, final):
        published.append(Path(final).name)
        publish(staged, final)

    monkeypatch.setattr(checkpoints, "publish", recording)
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1, "training.bf16": False}))
    trainer.train()
    trainer.save_model()
    assert published[-3:] == ["recipe.json", "inference.json", "README.md"], published
    assert published.index("adapter_model.safetensors") < published.index("recipe.json")


# --- Ctrl-C and damaged checkpoints --------------------------------------------------------------------------------


def test_ctrl_c_prints_one_line_with_the_resume_command_and_resume_finishes(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, tiny_recipe(tmp_path, **{**SAVES, "training.max_steps": 60, "training.save_total_limit": 2,
                                                   "training.logging_steps": 10}))
    returncode, stderr = signal_at_first_checkpoint(path, out, signal.SIGINT, cwd=tmp_path, env=ENV)
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    newest = last_checkpoint(out)  # what is on disk now: rotation may have removed the first checkpoint
    assert newest is not None and int(newest.rsplit("-", 1)[1]) < 60, "the run ended before Ctrl-C"
    line = stderr.strip().splitlines()[-1]
    assert line == (f"ia3-trainer: interrupted; the last checkpoint is {newest}; continue with: ia3-trainer train "
                    f"{path} --resume")

    command = shlex.split(line.split("continue with: ", 1)[1])
    assert main(command[1:]) == 0
    assert f"Resuming from {newest}" in capsys.readouterr().out
    assert json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())["global_step"] == 60


def test_a_damaged_newest_checkpoint_is_skipped_and_said_so(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    path = write(tmp_path, tiny_recipe(tmp_path, **SAVES))
    assert main(["train", path]) == 0
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a disk that lost the end of the file
    assert checkpoint_damage(out / "checkpoint-4") == "its adapter_model.safetensors is truncated or unreadable"
    capsys.readouterr()

    with caplog.at_level(logging.WARNING, logger="ia3_trainer"):
        assert main(["train", path, "--resume"]) == 0
    assert f"Resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out.splitlines()
    assert [record.getMessage() for record in caplog.records if record.name.startswith("ia3_trainer")] == [
        f"Skipping {out / 'checkpoint-4'}: its adapter_model.safetensors is truncated or unreadable; it cannot be "
        "resumed from"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4  # saved again

    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert checkpoint_damage(out / "checkpoint-2") == "its optimizer.pt is truncated or unreadable"
    err = fails(["train", path, "--set", f"training.resume_from_checkpoint={out / 'checkpoint-2'}", "--overwrite"],
                capsys)
    assert err == (f"ia3-trainer: error: training.resume_from_checkpoint: cannot resume from {out / 'checkpoint-2'}: "
                   "its optimizer.pt is truncated or unreadable; give a whole checkpoint-N folder, or pass --resume "
                   "to take the newest whole one")
    missing = out / "checkpoint-99"
    err = fails(["train", path, "--set", f"training.resume_from_checkpoint={missing}"], capsys)
    assert err == (f"ia3-trainer: error: training.resume_from_checkpoint: no such folder {missing}; give a "
                   "checkpoint-N folder, or pass --resume to continue from the newest checkpoint in "
                   "training.output_dir")


@pytest.mark.parametrize("record", [{"run_id": "x"}, {"run_id": "x", "recipe": "junk", "precision": {"a": 1},
                                                       "resumed": 3}])
def test_resume_reads_a_run_json_without_its_recipe_from_the_checkpoint(tmp_path, record):
    # record["recipe"] raised KeyError, which _agree does not gather: the other processes of a launch would wait.
    from ia3_trainer.training.runs import RunFolder

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    recipe = tiny_recipe(tmp_path)
    (out / "checkpoint-2" / "recipe.json").write_text(json.dumps(recipe))
    (out / RUN_FILE).write_text(json.dumps(record))
    changed = tiny_recipe(tmp_path, **{"training.learning_rate": 0.1})
    run = RunFolder(out)
    try:
        with pytest.raises(RecipeError, match=r"whose recipe differs in training.learning_rate \(0.3 -> 0.1\)"):
            run.open(changed, resume=True, precision="fp32")  # compared with the checkpoint's recipe
        run.release()
        run.open(recipe, resume=True, precision="fp32")
        run.begin(SimpleNamespace(world_size=1))
    finally:
        run.release()
    written = json.loads((out / RUN_FILE).read_text())
    assert written["recipe"] == recipe and written["run_id"] == "x" and written["precision"] == "fp32"
    assert len(written["resumed"]) == 1


def test_a_checkpoint_saved_again_replaces_the_old_one_without_removing_it_first(tmp_path, capsys, monkeypatch):
    # Resumed from checkpoint-2, the run reaches step 4 again: checkpoint-4 used to be removed (rmtree) before the
    # new one was renamed into place, and a crash in between left neither.
    import shutil

    out = tmp_path / "out"
    path = write(tmp_path, tiny_recipe(tmp_path, **SAVES))
    assert main(["train", path]) == 0
    (out / "checkpoint-4" / "left-by-the-first-save").write_text("")
    rmtree = shutil.rmtree

    def checked_rmtree(target, *args, **kwargs):
        rmtree(target, *args, **kwargs)
        assert (out / "checkpoint-4" / "trainer_state.json").is_file(), f"checkpoint-4 gone after removing {target}"

    monkeypatch.setattr(shutil, "rmtree", checked_rmtree)
    assert main(["train", path, "--set", f"training.resume_from_checkpoint={out / 'checkpoint-2'}"]) == 0
    assert f"Resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out.splitlines()
    assert checkpoint_damage(out / "checkpoint-4") is None
    assert not (out / "checkpoint-4" / "left-by-the-first-save").exists()  # the new folder, not a mix
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]


def test_publish_puts_the_old_folder_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    from ia3_trainer.layout import publish

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "a").write_text("old")
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "a").write_text("new")
    replace = os.replace

    def second_rename_fails(source, target):
        if str(source).endswith("staged"):
            raise OSError("a disk that went read-only")
        replace(source, target)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="read-only"):
        publish(tmp_path / "staged", tmp_path / "final")
    assert (tmp_path / "final" / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "staged"]  # no aside folder left
