"""Hyperparameter search on Optuna: one study, many workers, trials pruned early, resumed after a crash.

[`run_search`] trains a recipe at each trial of an Optuna study: one whole run (`from_recipe(...).train()`) in its
own folder of `training.output_dir`, `trial-<number>` (a grid point's folder is the point's name).

- Storage: `sqlite:///<output_dir>/study.db` by default; workers given the same SQLAlchemy URL or `journal:PATH` share
  the study. Trial numbers are atomic: no two trials share a folder. A worker stops once `n_trials` trials ran or
  run; one a racing worker asked past that is closed unrun (`surplus`, left out of the results).
- Pruning: each evaluation reports the objective; when the pruner (default `MedianPruner()`) says so the run stops
  (its adapter saved as at any end) and the trial is marked pruned.
- Crashes: Ctrl-C marks the running trial failed and queues its values again (a new trial; a grid point's retry
  replaces its unfinished run). A worker killed outright leaves its trial running: the next worker on the same
  machine sees the process gone and does the same; elsewhere the heartbeat does (RDB storages, after
  `HEARTBEAT_GRACE_S` seconds). Finished trials never run again.
- Under `accelerate launch` the main process talks to the storage and sends each trial's values and each pruning
  decision to the others: one trial is one distributed run.

`IA3Seq2SeqTrainer.hyperparameter_search` is transformers' own and needs a `model_init`; call `run_search` instead.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ia3_trainer.errors import (
    IA3TrainerError,
    InputError,
    NonFiniteLossError,
    RecipeError,
    RunFolderError,
    redact,
    redact_urls,
)
from ia3_trainer.recipe.loading import Recipe
from ia3_trainer.training import sweep
from ia3_trainer.training.storage import open_storage, require_optuna
from ia3_trainer.training.sweep import SearchParam, study_rows, trial_recipe, write_results


def _describe(spec: dict) -> str:
    parts = [f"--grid {key}={','.join(values)}" for key, values in spec.get("grid", {}).items()]
    parts += [f"--search {item}" for item in spec.get("search", [])]
    return " ".join(parts) + f", objective {spec.get('objective')} ({spec.get('direction')})"


def run_search(
    recipe: str | Path | dict | Recipe,
    *,
    grid: dict[str, list[Any]] | list[str] | None = None,
    search: list[SearchParam] | list[str] | None = None,
    overrides: dict | list[str] | None = None,
    n_trials: int | None = None,
    objective: str | None = None,
    direction: str | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    pruner=None,
    sampler=None,
    overwrite: bool = False,
    trainer_cls=None,
) -> list[dict[str, Any]]:
    """Search `recipe`'s hyperparameters; return the study's results, one row per trial (`sweep.study_rows`).

    Give `grid` (`{"training.learning_rate": [3e-3, 8e-3]}` or `--grid` texts: each point once) or `search`
    (`--search` texts, e.g. `"training.learning_rate=log:1e-4:3e-2"`, drawn by `sampler`, default TPE, `n_trials`
    times, default 20). `objective` defaults to the recipe's main metric (`sweep.default_objective`), `pruner` to a
    `MedianPruner` (`optuna.pruners.NopPruner()`: none), `storage` to `sqlite:///<output_dir>/study.db`, `study_name`
    to the recipe's name: the same call again, in any process on the same storage, continues the study. `overwrite`
    deletes the study first; `trainer_cls` defaults to [`IA3Seq2SeqTrainer`]."""
    optuna = require_optuna()
    if trainer_cls is None:
        from ia3_trainer.training.trainer import IA3Seq2SeqTrainer as trainer_cls
    plan = sweep.plan_search(recipe, grid, search, overrides, n_trials, objective, direction,
                             trainer_cls.recipe_sections)
    base, root = plan.base, Path(plan.base.training["output_dir"])
    rank = base.training_args().process_index  # sets up the process group under accelerate launch
    if rank != 0:
        return _follow(plan, trainer_cls)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file there, or a folder this user cannot write in
        raise RunFolderError(key="training.output_dir", problem=f"cannot make {root}: {error.strerror or error}",
                             fix="choose another training.output_dir") from None
    storage = storage or f"sqlite:///{root.resolve() / 'study.db'}"
    study_name = study_name or base.name or "sweep"
    backend = open_storage(storage)
    if overwrite:
        with contextlib.suppress(KeyError):  # KeyError: no such study yet
            running = [t.number for t in optuna.load_study(study_name=study_name, storage=backend).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if not _lost(t)]
            if running:
                raise InputError(f"--overwrite: study {study_name!r} has trials {running} running; stop their workers")
            optuna.delete_study(study_name=study_name, storage=backend)
    if sampler is None:
        sampler = _grid_sampler(plan.params) if plan.names else optuna.samplers.TPESampler()
    pruner = pruner or optuna.pruners.MedianPruner()
    study = optuna.create_study(storage=backend, study_name=study_name, direction=plan.direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    recorded = study.user_attrs.get("spec")
    if recorded is None:
        study.set_user_attr("spec", plan.spec)
    elif recorded != plan.spec:
        raise InputError(
            f"--study {study_name}: {redact_urls(storage)} holds study {study_name!r} of another search "
            f"({_describe(recorded)}); pass --overwrite to replace it, --study NAME for a new study, or "
            "choose another training.output_dir"
        )
    ours = {Path(t.user_attrs["folder"]) for t in study.get_trials(deepcopy=False) if "folder" in t.user_attrs}
    sweep.check_folders(root, study_name, plan.names, ours, overwrite or base.training.get("overwrite_output_dir"))
    _Search(study, backend, plan, trainer_cls, overwrite).run(plan.n_trials)
    rows = study_rows(study, plan.params, list(plan.names))
    if any(row["state"] == "COMPLETE" for row in rows):
        best = study.best_trial.number
        rows = [{**row, "best": row["trial"] == best} for row in rows]
    write_results(rows, root, plan.params, plan.objective)
    return rows


def _grid_sampler(params: list[SearchParam]):
    """Optuna's `GridSampler` over each grid value's index ([`sample`]); the search loop decides when the grid is
    done (`after_trial` may stop only an `optimize` loop)."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values):
            pass

    return GridSampler({param.key: list(range(len(param.choices))) for param in params}, seed=0)


class PruneTrial(TrainerCallback):
    """Reports the objective at each evaluation to an Optuna trial and stops the run when its pruner says so (then
    `pruned` is True). Under a launch only the main process holds the trial (`trial=None` elsewhere); its decision
    is sent to every process, which all stop together."""

    def __init__(self, trial, objective: str):
        self.trial, self.objective, self.pruned = trial, objective, False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.objective)
        prune = False
        if self.trial is not None and isinstance(value, (int, float)) and math.isfinite(value):
            self.trial.report(float(value), state.global_step)
            prune = self.trial.should_prune()
        if _broadcast(prune):
            self.pruned = control.should_training_stop = True


def _broadcast(value):
    """`value` of the main process, on every process of a launch (as it is without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train(trainer_cls, recipe: Recipe, callback: PruneTrial) -> dict[str, float]:
    """One trial's run, start to end; its train and final eval metrics."""
    trainer = trainer_cls.from_recipe(recipe, callbacks=[callback])
    metrics = dict(trainer.train().metrics)  # the run's results: train and last eval_* metrics, as all_results.json
    del trainer
    gc.collect()  # free the model before the next trial loads its own
    return metrics


def _follow(plan: sweep.SearchPlan, trainer_cls) -> list:
    """A launch's other processes: train each trial the main process sends, until it sends None."""
    while (job := _broadcast(None)) is not None:
        values, folder, overwrite = job
        recipe = trial_recipe(plan.base, values, folder, overwrite, trainer_cls.recipe_sections)
        _train(trainer_cls, recipe, PruneTrial(None, plan.objective))
    return []


class _Search:
    """The main process's loop: ask a trial, train it, tell its result, until the study holds enough trials."""

    def __init__(self, study, storage, plan: sweep.SearchPlan, trainer_cls, overwrite: bool):
        self.study, self.storage, self.trainer_cls, self.overwrite = study, storage, trainer_cls, overwrite
        self.base, self.params, self.names, self.objective = plan.base, plan.params, plan.names, plan.objective
        self.sections = trainer_cls.recipe_sections
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.root = Path(plan.base.training["output_dir"])

    def run(self, n_trials: int) -> None:
        from optuna.trial import TrialState

        try:
            while True:
                self.recover()
                trials = self.study.get_trials(deepcopy=False)
                if sum(map(_counted, trials)) >= n_trials and all(t.state != TrialState.WAITING for t in trials):
                    break
                with warnings.catch_warnings():  # the heartbeat is ours (_heartbeat), not Study.optimize's
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    trial = self.study.ask()
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
                retry = "failed_trial" in self.storage.get_trial(trial_id).system_attrs
                before = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number]
                if not retry and sum(map(_counted, before)) >= n_trials:
                    trial.set_user_attr("surplus", True)  # another worker asked the last trial first
                    self.study.tell(trial, state=TrialState.FAIL)
                    break
                self.run_trial(trial, trial_id, retry)
        finally:
            _broadcast(None)

    def run_trial(self, trial, trial_id: int, retry: bool) -> None:
        from optuna.trial import TrialState

        values = {param.key: sample(trial, param) for param in self.params}
        name = self.names.get(sweep.value_text(values)) if self.names else f"trial-{trial.number}"
        folder = (self.root / name).resolve()
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        overwrite = self.overwrite or (retry and bool(self.names))  # a grid point's retry replaces its lost run
        try:
            recipe = trial_recipe(self.base, values, folder, overwrite, self.sections)
        except RecipeError as error:  # a value inside a range that the ends did not show to be invalid
            return self.fail(trial, str(error))
        callback = PruneTrial(trial, self.objective)
        with _heartbeat(self.storage, trial_id):
            try:
                _broadcast((values, str(folder), overwrite))
                metrics = _train(self.trainer_cls, recipe, callback)
            except KeyboardInterrupt:
                # Lost, not failed: queued again with the same values, as a killed worker's trial is.
                self.give_back(trial)
                raise
            except Exception as error:
                said = str(error) if isinstance(error, IA3TrainerError) else f"{type(error).__name__}: {error}"
                self.fail(trial, said)
                if not isinstance(error, NonFiniteLossError):
                    raise
                return  # diverged: the search goes on
        trial.set_user_attr("metrics", metrics)  # Optuna's JSON keeps inf and NaN; sweep.json writes them as null
        value = metrics.get(self.objective)
        if callback.pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
        elif value is None:
            known = ", ".join(sorted(key for key in metrics if key == "train_loss" or key.startswith("eval_")))
            problem = f"--objective {self.objective}: not among a run's metrics; choose one of {known}"
            self.fail(trial, problem)
            raise InputError(problem)
        elif not math.isfinite(value):
            self.fail(trial, f"{self.objective} is {value}")
        else:
            self.study.tell(trial, value)
        rows = study_rows(self.study, self.params, list(self.names))
        write_results(rows, self.root, self.params, self.objective, plot=False)

    def fail(self, trial, error: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("error", redact(error.splitlines()[0]))  # kept in the storage and in sweep.json
        self.study.tell(trial, state=TrialState.FAIL)

    def give_back(self, trial) -> None:
        from optuna.trial import TrialState

        _queue_again(self.study, self.study.tell(trial, state=TrialState.FAIL))

    def recover(self) -> None:
        """Queue again the trials of workers gone without a word: on this machine, those whose process is gone; on
        any, those whose heartbeat stopped (RDB storages). Only the worker that marks the trial failed queues it."""
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
            for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if not _lost(trial):
                    continue
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
                try:
                    if not self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker did it first
                _queue_again(self.study, self.storage.get_trial(trial_id))


def _queue_again(study, failed) -> None:
    """A new waiting trial with the values (and a grid point's id) of the `failed` one (Optuna's own retry)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, failed)


def sample(trial, param: SearchParam) -> Any:
    """`trial`'s value of one searched key. Of a choice (a grid's values too) Optuna gets the index only: the value
    may be a data URL with a password or token, and the study storage (`study.db`, a shared database) keeps what it
    gets; every worker has the values from its own command line (`sweep.study_rows` reads them back the same way)."""
    if param.kind == "choice":
        return param.choices[trial.suggest_categorical(param.key, list(range(len(param.choices))))]
    if param.kind == "int":
        return trial.suggest_int(param.key, param.low, param.high)
    return trial.suggest_float(param.key, param.low, param.high, log=param.kind == "log")


def _counted(trial) -> bool:
    """Whether a trial takes one of the study's `n_trials`: it ran, runs or waits to, or failed by itself; not a
    lost one (queued again) nor a surplus one."""
    from optuna.trial import TrialState

    if trial.user_attrs.get("surplus"):
        return False
    return trial.state != TrialState.FAIL or "error" in trial.user_attrs


def _lost(trial) -> bool:
    """Whether a running trial's worker ran on this machine and its process is gone."""
    worker = trial.user_attrs.get("worker") or {}
    return worker.get("host") == socket.gethostname() and not _alive(worker.get("pid"))


def _alive(pid) -> bool:
    """Whether process `pid` of this machine runs (an unknown pid counts as running: the heartbeat decides)."""
    if not isinstance(pid, int) or pid == os.getpid():
        return pid != os.getpid()  # this process runs no trial while it recovers: one left running is lost
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int):
    """While a trial trains, tell an RDB storage every `HEARTBEAT_S` seconds that its worker is alive."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "record_heartbeat") else None
    stop = threading.Event()

    def beat():
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    if interval:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if interval:
            thread.join()
