"""ia3-trainer sweep on Optuna: searched ranges checked before any trial, trials pruned at evaluations, several
workers sharing one study, and a study that survives Ctrl-C and SIGKILL (`ia3_trainer.training.search`)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ia3_trainer import NonFiniteLossError, RecipeError
from ia3_trainer.cli.main import main
from ia3_trainer.training.search import run_search
from ia3_trainer.training.sweep import SearchParam, parse_search, point_name

from conftest import REPO, tiny_recipe


def _recipe_file(tmp_path, **overrides) -> Path:
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 2, "data.max_eval_samples": 8, **overrides})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return path


def _trials(tmp_path, name: str = "tiny"):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    return sorted(study.get_trials(), key=lambda trial: trial.number)


def _worker(tmp_path, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "IA3_TRAINER_DEBUG": "0"}
    return subprocess.Popen([sys.executable, "-m", "ia3_trainer", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_parse_search():
    assert parse_search(["training.learning_rate=log:1e-4:3e-2", "training.num_train_epochs=int:1:5",
                         "training.warmup_ratio=float:0:0.2", 'ia3.target_modules=choice:[["k","v"],["q"]]']) == [
        SearchParam("training.learning_rate", "log", 1e-4, 3e-2, text="training.learning_rate=log:1e-4:3e-2"),
        SearchParam("training.num_train_epochs", "int", 1, 5, text="training.num_train_epochs=int:1:5"),
        SearchParam("training.warmup_ratio", "float", 0, 0.2, text="training.warmup_ratio=float:0:0.2"),
        SearchParam("ia3.target_modules", "choice", choices=(["k", "v"], ["q"]),
                    text='ia3.target_modules=choice:[["k","v"],["q"]]'),
    ]
    for bad, message in [("training.learning_rate=1e-4:3e-2", "expected KEY=log:LOW:HIGH"),
                         ("training.learning_rate=log:0:1", "needs LOW > 0"),
                         ("training.learning_rate=float:1:0.5", "LOW must be below HIGH"),
                         ("training.num_train_epochs=int:1:2.5", "expected KEY=log"),
                         ("training.seed=choice:1,1", "each once"),
                         ("training.output_dir=choice:a,b", "the sweep sets it")]:
        with pytest.raises(ValueError, match=message):
            parse_search([bad])


def test_a_range_that_can_produce_an_invalid_recipe_is_refused_before_any_trial(tmp_path, capsys):
    path = _recipe_file(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["sweep", str(path), "--search", "training.learning_rate=float:-1:1", "--search",
              "training.seed=choice:1,-5", "--search", "training.num_train_epochs=int:1:3"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ia3-trainer: error: --search training.learning_rate=float:-1:1: training.learning_rate: must be > 0, got -1",
        "--search training.seed=choice:1,-5: training.seed: must be in [0, 2**32 - 1], got -5",
    ]
    assert not (tmp_path / "out").exists()
    for argv, message in [(["--grid", "training.seed=1", "--search", "training.learning_rate=log:1e-3:1"], "either"),
                          (["--search", "training.learning_rate=log:1e-3:1", "--storage", "nonsense://x"],
                           "--storage nonsense://x: "),
                          (["--grid", "training.seed=1,2", "--trials", "3"], "runs each of its 2 points once")]:
        with pytest.raises(SystemExit):
            main(["sweep", str(path), *argv])
        [line] = capsys.readouterr().err.strip().splitlines()
        assert message in line


def test_a_grid_trains_the_same_runs_in_the_same_folders_as_one_train_each(tmp_path):
    from ia3_trainer import IA3Seq2SeqTrainer

    raw = tiny_recipe(tmp_path, **{"training.max_steps": 2, "data.max_eval_samples": 8})
    grid = {"training.learning_rate": [0.01, 0.3], "training.seed": [1, 2]}
    rows = run_search(raw, grid=grid)
    assert [(row["training.learning_rate"], row["training.seed"]) for row in rows] == [
        (0.01, 1), (0.01, 2), (0.3, 1), (0.3, 2)]  # the grid's order, as before
    assert [Path(row["output_dir"]) for row in rows] == [
        tmp_path / "out" / point_name({"training.learning_rate": lr, "training.seed": seed})
        for lr, seed in [(0.01, 1), (0.01, 2), (0.3, 1), (0.3, 2)]]
    assert {row["state"] for row in rows} == {"COMPLETE"} and sum(row.get("best", False) for row in rows) == 1
    for row in rows[3:]:  # what one `train` of the point gives
        overrides = {"training.learning_rate": row["training.learning_rate"], "training.seed": row["training.seed"],
                     "training.output_dir": str(tmp_path / "alone" / Path(row["output_dir"]).name)}
        trainer = IA3Seq2SeqTrainer.from_recipe(raw, overrides)
        alone = {**trainer.train().metrics, **trainer.final_eval_metrics()}
        for key in ("train_loss", "eval_loss", "eval_label_accuracy", "eval_rank_accuracy"):
            assert row[key] == pytest.approx(alone[key], rel=1e-5), key
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [row["trial"] for row in saved] == [row["trial"] for row in rows]
    assert (tmp_path / "out" / "results.csv").read_text().splitlines()[0].startswith(
        "training.learning_rate,training.seed,output_dir,")
    assert (tmp_path / "out" / "search.png").read_bytes().startswith(b"\x89PNG")


def test_a_search_prunes_hopeless_learning_rates(tmp_path):
    import optuna

    raw = tiny_recipe(tmp_path, **{"training.max_steps": 4, "training.eval_strategy": "steps",
                                   "training.eval_steps": 1, "data.max_eval_samples": 8})
    # Below about 1e-3 the four steps leave the loss where it started: a trial there is worse than the median at
    # its first evaluation as soon as earlier trials learned. The seeds make the draws (and so the test) fixed.
    rows = run_search(raw, search=["training.learning_rate=log:1e-7:1"], n_trials=6, objective="eval_loss",
                      pruner=optuna.pruners.MedianPruner(n_startup_trials=1),
                      sampler=optuna.samplers.TPESampler(seed=0))
    assert len(rows) == 6 and {row["state"] for row in rows} <= {"COMPLETE", "PRUNED"}
    pruned = [row for row in rows if row["state"] == "PRUNED"]
    assert pruned, rows
    for row in pruned:
        folder = Path(row["output_dir"])
        assert folder.name == f"trial-{row['trial']}" and (folder / "adapter_model.safetensors").is_file()
        assert row["training.learning_rate"] < 1e-2
    trials = _trials(tmp_path)
    assert all(len(trial.intermediate_values) < 4 for trial in trials if trial.state.name == "PRUNED")
    assert any(len(trial.intermediate_values) == 4 for trial in trials if trial.state.name == "COMPLETE")
    best = next(row for row in rows if row.get("best"))
    assert best["objective"] == min(row["eval_loss"] for row in rows if row["state"] == "COMPLETE")


def test_ctrl_c_loses_only_the_running_trial(tmp_path):
    from ia3_trainer import IA3Seq2SeqTrainer

    class Interrupted(IA3Seq2SeqTrainer):
        def train(self, *args, **kwargs):
            if Path(self.args.output_dir).name == "trial-1":
                raise KeyboardInterrupt
            return super().train(*args, **kwargs)

    raw = tiny_recipe(tmp_path, **{"training.max_steps": 1, "data.max_eval_samples": 8})
    search = ["training.learning_rate=log:1e-3:0.3"]
    with pytest.raises(KeyboardInterrupt):
        run_search(raw, search=search, n_trials=3, trainer_cls=Interrupted)
    first = _files(tmp_path / "out" / "trial-0")
    rows = run_search(raw, search=search, n_trials=3)
    assert [(row["trial"], row["state"]) for row in rows] == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE"),
                                                              (3, "COMPLETE")]
    trials = _trials(tmp_path)
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].params == trials[1].params  # queued again
    assert _files(tmp_path / "out" / "trial-0") == first


def test_a_diverged_trial_fails_and_the_search_goes_on(tmp_path):
    from ia3_trainer import IA3Seq2SeqTrainer

    class Diverging(IA3Seq2SeqTrainer):  # what the non-finite guard raises at a hopeless learning rate
        def train(self, *args, **kwargs):
            if Path(self.args.output_dir).name == "trial-0":
                raise NonFiniteLossError(key="training.non_finite_loss", problem="loss is nan at step 1",
                                         fix="lower training.learning_rate")
            return super().train(*args, **kwargs)

    raw = tiny_recipe(tmp_path, **{"training.max_steps": 1, "data.max_eval_samples": 8})
    rows = run_search(raw, search=["training.learning_rate=log:1e-3:0.3"], n_trials=2, trainer_cls=Diverging)
    assert [(row["trial"], row["state"]) for row in rows] == [(0, "FAIL"), (1, "COMPLETE")]  # it counts as a trial
    assert rows[0]["error"].startswith("training.non_finite_loss: loss is nan")
    assert rows[1].get("best") is True


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    path = _recipe_file(tmp_path, **{"training.max_steps": 1})
    argv = ["sweep", str(path), "--search", "training.learning_rate=log:1e-3:0.3", "--trials", "4", "--no-prune"]
    workers = [_worker(tmp_path, argv) for _ in range(2)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr
    trials = [trial for trial in _trials(tmp_path) if not trial.user_attrs.get("surplus")]
    assert [trial.state.name for trial in trials] == ["COMPLETE"] * 4
    folders = [Path(trial.user_attrs["folder"]) for trial in trials]
    assert [folder.name for folder in folders] == [f"trial-{trial.number}" for trial in trials]
    runs = [json.loads((folder / "run.json").read_text())["run_id"] for folder in folders]
    assert len(set(runs)) == 4  # four runs, each trained once
    surplus = [trial for trial in _trials(tmp_path) if trial.user_attrs.get("surplus")]
    assert not any((tmp_path / "out" / f"trial-{trial.number}").exists() for trial in surplus)
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert sorted(row["trial"] for row in rows) == [trial.number for trial in trials]


@pytest.mark.slow
def test_a_killed_worker_loses_only_its_running_trial(tmp_path):
    path = _recipe_file(tmp_path)
    argv = ["sweep", str(path), "--search", "training.learning_rate=log:1e-3:0.3", "--trials", "3", "--no-prune"]
    worker = _worker(tmp_path, argv)
    try:
        started = tmp_path / "out" / "trial-1" / "run.json"  # the second trial has begun training
        deadline = time.monotonic() + 600
        while not started.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.poll() is None, worker.communicate()[1]
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)  # reaped: its pid is gone, as after a crash
    finally:
        worker.kill()
    first = _files(tmp_path / "out" / "trial-0")
    before = _trials(tmp_path)
    assert [trial.state.name for trial in before] == ["COMPLETE", "RUNNING"]

    assert main(argv) == 0  # the same command again continues the study
    after = _trials(tmp_path)
    assert [trial.state.name for trial in after] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert after[2].system_attrs["failed_trial"] == 1 and after[2].params == before[1].params
    assert after[0].value == before[0].value and after[0].user_attrs == before[0].user_attrs
    assert _files(tmp_path / "out" / "trial-0") == first  # untouched
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert rows[0]["eval_loss"] == before[0].user_attrs["metrics"]["eval_loss"]
    assert [row["state"] for row in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_run_search_refuses_recipe_errors_of_the_base(tmp_path):
    with pytest.raises(RecipeError, match="training.learning_rate"):
        run_search(tiny_recipe(tmp_path, **{"training.learning_rate": -1}), search=["training.seed=int:1:3"])


@pytest.mark.slow
def test_under_accelerate_launch_one_trial_is_one_distributed_run(tmp_path):
    from conftest import free_port

    # Pruning on (a report at each evaluation): every process must take the main one's decision, or the next
    # collective hangs. Short sources and DDP's default find_unused_parameters make a warning of ours (truncation)
    # and one of torch's C++ side (no unused parameter found): neither prints once per process (issue 18).
    path = _recipe_file(tmp_path, **{"training.max_steps": 2, "training.eval_strategy": "steps",
                                     "training.eval_steps": 1, "training.disable_tqdm": True,
                                     "data.max_source_length": 8})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "ia3_trainer", "sweep", str(path), "--search",
               "training.learning_rate=log:1e-3:0.3", "--trials", "2", "--objective", "eval_loss"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| learning_rate |") == 1  # the main process alone prints the table
    # Each trial's run warns once (two trials), torch once a process (the main one); four and two before.
    assert result.stderr.count("sources are longer than data.max_source_length=8 tokens") == 2, result.stderr[-3000:]
    assert result.stderr.count("find_unused_parameters=True") == 1, result.stderr[-3000:]
    trials = _trials(tmp_path)
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE"]
    assert all(len(trial.intermediate_values) == 2 for trial in trials)
    for trial in trials:
        assert (Path(trial.user_attrs["folder"]) / "adapter_model.safetensors").is_file()


def test_overwrite_never_deletes_a_study_other_workers_are_running(tmp_path):
    import socket

    import optuna

    (tmp_path / "out").mkdir()
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    trial = study.ask()  # a trial another worker (a live process on this machine) trains now
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getppid()})
    with pytest.raises(ValueError, match=r"^--overwrite: study 'tiny' has trials \[0\] running; stop their workers"):
        run_search(tiny_recipe(tmp_path), search=["training.seed=int:1:3"], overwrite=True)
    assert [t.state.name for t in _trials(tmp_path)] == ["RUNNING"]
