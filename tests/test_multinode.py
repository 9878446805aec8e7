"""Two machines for real (issue 13): the README's multi-machine commands, run on one host.

Two `accelerate launch` launchers with `--num_machines 2`, `--machine_rank 0` and `1` and the main process on
127.0.0.1, one CPU process each (`--multi_gpu` runs torchrun; `training.use_cpu: true` makes it gloo). Each "machine"
runs in its own working folder with the relative `training.output_dir: out`: the same path on two disks, as on
machines that do not share one. Only the main process of machine 0 pushes and writes metrics; with
`training.save_on_each_node` false only machine 0 keeps checkpoints and the final adapter, with true each machine
keeps its own whole copies and `--resume` works after a machine is lost.
"""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
from safetensors.torch import load_file

from ia3_trainer import ProcessesDisagreeError, load_recipe
from ia3_trainer.cli.main import main
from ia3_trainer.data.preparation import prepare_data
from ia3_trainer.training.checkpoints import last_checkpoint

from conftest import REPO, assert_same_adapter, free_port, tiny_recipe
from hub_server import FAKE_TOKEN, HubServer


STEPS, SAVE_STEPS, LOGGING_STEPS = 48, 6, 8  # 64 examples, 16 a step: 4 steps an epoch, so saves fall mid-epoch
RUN = {
    "data.validation_size": 0, "training.max_steps": STEPS, "training.per_device_train_batch_size": 8,
    "training.save_strategy": "steps", "training.save_steps": SAVE_STEPS, "training.save_total_limit": 2,
    "training.logging_steps": LOGGING_STEPS, "training.disable_tqdm": True, "training.bf16": False,
    # Examples in the same order in every run (see test_loss_equality.py), and updates linear in the gradients, so
    # that adapters from differently split runs agree to float noise.
    "training.train_sampling_strategy": "random", "training.optim": "sgd", "training.learning_rate": 1.0,
    "training.lr_scheduler_type": "constant",
    "training.ddp_find_unused_parameters": False,
    "training.include_num_input_tokens_seen": "non_padding",
}
REPO_ID = "alice/tiny-ia3-two-machines"


def write_recipe(tmp_path, name, **overrides):
    # A relative training.output_dir: each machine's working folder stands for its own disk.
    raw = tiny_recipe(tmp_path, **{**RUN, "training.output_dir": "out", **overrides})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def launch(recipe, machine, port, *extra, machines=2, env=None):
    """One machine's launcher, in `machine` (its working folder), its output in machine.out and machine.err."""
    machine.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", str(machines),
               "--machine_rank", machine.name[-1] if machines > 1 else "0", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--num_processes", "2", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "ia3_trainer", "train", str(recipe), *extra]
    with open(f"{machine}.out", "w") as stdout, open(f"{machine}.err", "w") as stderr:
        return subprocess.Popen(command, cwd=machine, env=env, stdout=stdout, stderr=stderr)


def kill_machine(launcher):
    """SIGKILL a launcher and the training processes it started (torchrun starts them in sessions of their own)."""
    try:
        victims = psutil.Process(launcher.pid).children(recursive=True) + [psutil.Process(launcher.pid)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.wait(timeout=30)


def run_machines(launchers, timeout=180):
    """Wait for every launcher; whatever is still running at the end (a failure, a hang) is killed."""
    deadline = time.monotonic() + timeout
    try:
        for launcher in launchers:
            launcher.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                kill_machine(launcher)
    return [launcher.returncode for launcher in launchers]


def output(machine, stream="err"):
    return (machine.parent / f"{machine.name}.{stream}").read_text()


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def env():
    # The worktree's own package (the launchers run in other folders), one thread a process, and the Hub only as
    # the fake one each test starts.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "HF_TOKEN": FAKE_TOKEN,
        "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    """The adapter of the same run in one process accumulating two batches a step (no Hub): the same steps as two
    processes, each batch padded alike (see test_loss_equality.py), trained here rather than launched."""
    tmp_path = tmp_path_factory.mktemp("one-process")
    recipe = write_recipe(tmp_path, "recipe", **{"training.gradient_accumulation_steps": 2,
                                                 "training.output_dir": str(tmp_path / "out")})
    assert main(["train", str(recipe)]) == 0
    return adapter(tmp_path / "out")


@pytest.mark.slow
def test_two_machines_train_as_one_and_only_machine_0_saves_and_pushes(tmp_path, one_machine, env, tokenizer):
    recipe = write_recipe(tmp_path, "recipe", **{"hub.repo_id": REPO_ID, "training.save_on_each_node": False})
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    with HubServer() as hub:
        env = {**env, "HF_ENDPOINT": hub.endpoint}
        port = free_port()
        codes = run_machines([launch(recipe, machine, port, env=env) for machine in machines])
        assert codes == [0, 0], output(machines[0])[-3000:] + output(machines[1])[-3000:]

        # The same adapter as one process with the same steps (as one machine with two processes gives).
        out = machines[0] / "out"
        assert_same_adapter(adapter(out), one_machine)
        # Both processes trained, each on its half: every example once an epoch (twelve epochs of 64).
        prepared = prepare_data(load_recipe(json.loads(recipe.read_text())).data, tokenizer)
        tokens = sum(len(ids) for ids in prepared.train_dataset["input_ids"])
        metrics = json.loads((out / "all_results.json").read_text())
        assert metrics["num_input_tokens_seen"] == STEPS * 16 // len(prepared.train_dataset) * tokens

        # One push, one adapter, one summary: all on machine 0. Machine 1's disk keeps nothing, not even the RNG
        # state it staged at each save.
        assert [c["message"] for c in hub.commits] == [f"Upload final adapter (step {STEPS})"]
        assert output(machines[0], "out").count("saved to out") == 1
        assert "saved to" not in output(machines[1], "out")
        assert "trainable params" not in output(machines[1], "out")
        assert files(machines[1]) == []
        last = [f"checkpoint-{STEPS - SAVE_STEPS}", f"checkpoint-{STEPS}"]  # save_total_limit 2
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == last
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                "rng_state_0.pth"} <= set(files(out / last[-1]))

        # Machine 1 has no checkpoint to resume from: both machines stop at once with the same one line.
        port = free_port()
        codes = run_machines([launch(recipe, machine, port, "--resume", env=env) for machine in machines])
        assert codes == [1, 1]  # torchrun's code for a failed process; the process itself exits 2
        line = (
            "ia3-trainer: error: training.output_dir: no checkpoint in out that every process has, to resume from "
            f"(process 0: checkpoint-{STEPS}, process 1: none); each machine reads its own disk: set "
            "training.save_on_each_node to true when machines do not share one (or put training.output_dir on a "
            "shared filesystem), or train without --resume to start over"
        )
        for machine in machines:
            assert line in output(machine).splitlines(), output(machine)[-3000:]
            assert "[rank" not in output(machine)  # no traceback of a training process (torchrun prints its own)
        assert len(hub.commits) == 1


@pytest.mark.slow
def test_each_machine_saves_its_own_checkpoints_and_both_resume_after_one_is_killed(tmp_path, one_machine, env):
    recipe = write_recipe(tmp_path, "recipe", **{"hub.repo_id": REPO_ID, "training.save_on_each_node": True})
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    with HubServer() as hub:
        env = {**env, "HF_ENDPOINT": hub.endpoint}
        port = free_port()
        launchers = [launch(recipe, machine, port, env=env) for machine in machines]
        try:  # machine 1 is lost once its disk holds a checkpoint; machine 0 fails at its next collective
            deadline = time.monotonic() + 180
            first = machines[1] / "out" / f"checkpoint-{SAVE_STEPS}"
            while not first.is_dir() and launchers[1].poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            kill_machine(launchers[1])
            started = time.monotonic()
            launchers[0].wait(timeout=60)
            waited = time.monotonic() - started
        finally:
            run_machines(launchers, timeout=1)
        assert launchers[1].returncode == -9, "machine 1 ended before it was killed:\n" + output(machines[1])[-3000:]
        # It failed by itself, not at the 30-minute timeout: gloo sees the killed process's connections reset, and
        # torchrun gives its worker up to 30 s to end after SIGTERM (hence the bound of the wait above). (A machine
        # that vanishes without closing them, a power cut, keeps the others waiting: under use_cpu transformers
        # 5.24 does not pass training.ddp_timeout to the process group, so that is torch's default of 30 minutes.)
        assert launchers[0].returncode == 1 and waited < 60, output(machines[0])[-3000:]
        print(f"machine 0 failed {waited:.1f} s after machine 1 was killed at step {SAVE_STEPS} or later")
        newest = [last_checkpoint(machine / "out") for machine in machines]
        assert None not in newest
        resumed_at = min(int(path.rsplit("-", 1)[1]) for path in newest)
        assert resumed_at < STEPS and not (machines[0] / "out" / "adapter_model.safetensors").exists()
        assert hub.commits == []

        port = free_port()
        codes = run_machines([launch(recipe, machine, port, "--resume", env=env) for machine in machines])
        assert codes == [0, 0], output(machines[0])[-3000:] + output(machines[1])[-3000:]
        # It resumed (logging only the steps after the checkpoint) and ended where an uninterrupted run does.
        logged = sum(step % LOGGING_STEPS == 0 for step in range(resumed_at + 1, STEPS + 1))
        assert output(machines[0], "out").count("{'loss'") == logged
        for machine in machines:  # each machine keeps whole checkpoints and the final adapter
            out = machine / "out"
            assert_same_adapter(adapter(out), one_machine)
            checkpoints = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
            assert checkpoints == [f"checkpoint-{STEPS - SAVE_STEPS}", f"checkpoint-{STEPS}"]  # save_total_limit 2
            saved = set(files(out / f"checkpoint-{STEPS}"))
            rank = int(machine.name[-1])
            assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                    f"rng_state_{rank}.pth"} <= saved and f"rng_state_{1 - rank}.pth" not in saved
            assert_same_adapter(adapter(out / f"checkpoint-{STEPS}"), one_machine)
        assert (machines[0] / "out" / "all_results.json").is_file()  # metrics: the main process only
        assert not (machines[1] / "out" / "all_results.json").exists()
        assert [c["message"] for c in hub.commits] == [f"Upload final adapter (step {STEPS})"]


def agree(monkeypatch, tmp_path, steps_per_process):
    """`last_checkpoint` on process 0, whose disk holds `steps_per_process[0]`, the others holding the rest."""
    import accelerate.utils

    for step in steps_per_process[0]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    others = [sorted(steps, reverse=True) for steps in steps_per_process[1:]]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: mine + others)
    accelerator = SimpleNamespace(num_processes=len(steps_per_process))  # all last_checkpoint reads of one
    return last_checkpoint(tmp_path, accelerator)


def test_processes_resume_from_the_newest_step_all_of_them_have(tmp_path, monkeypatch, caplog):
    # Machine 1 was lost before renaming its checkpoint-8: both resume from 4, which machine 0 still keeps.
    assert agree(monkeypatch, tmp_path, [[4, 8], [4]]) == str(tmp_path / "checkpoint-4")
    assert "Resuming from step 4, the newest checkpoint every process has" in caplog.text


def test_no_checkpoint_anywhere_is_none_and_one_missing_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "none").mkdir()
    assert agree(monkeypatch, tmp_path / "none", [[], []]) is None
    with pytest.raises(ProcessesDisagreeError) as info:
        agree(monkeypatch, tmp_path, [[6], [6], [], []])
    assert str(info.value).startswith(
        f"training.output_dir: no checkpoint in {tmp_path} that every process has, to resume from (processes 0-1: "
        "checkpoint-6, processes 2-3: none); each machine reads its own disk")
