"""Surviving crashes: kill a run and resume it, checkpoints that are whole or absent, and non-finite losses."""

import json
import logging
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ia3_trainer import IA3Seq2SeqTrainer, NonFiniteLossError, RecipeError
from ia3_trainer.cli.main import main
from ia3_trainer.training.checkpoints import last_checkpoint

from conftest import signal_at_first_checkpoint, tiny_recipe


# 64 examples in batches of 2: 32 steps an epoch, so checkpoints every 5 steps fall mid-epoch.
RUN = {
    "data.validation_size": 0, "training.max_steps": 60, "training.per_device_train_batch_size": 2,
    "training.save_strategy": "steps", "training.save_steps": 5, "training.save_total_limit": 2,
    "training.seed": 42, "training.data_seed": 7, "training.use_cpu": True, "training.dataloader_num_workers": 0,
    "training.logging_steps": 5, "training.disable_tqdm": True,
}


def write_recipe(tmp_path, name, **overrides):
    raw = tiny_recipe(tmp_path, **overrides)
    raw["training"]["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return str(path)


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def global_step(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_adapter(tmp_path, caplog, capsys):
    killed_recipe = write_recipe(tmp_path, "killed", **RUN)
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same single thread as this process (conftest)
    returncode, stderr = signal_at_first_checkpoint(killed_recipe, killed_dir, signal.SIGKILL, cwd=tmp_path, env=env)
    assert returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-2000:]}"
    assert not (killed_dir / "adapter_model.safetensors").exists()
    newest = last_checkpoint(killed_dir)
    assert newest is not None
    killed_at = int(newest.rsplit("-", 1)[1])
    assert 0 < killed_at < RUN["training.max_steps"] and killed_at % 32, "not killed mid-epoch"
    at_kill = adapter(newest)

    whole_recipe = write_recipe(tmp_path, "whole", **RUN)
    assert main(["train", whole_recipe]) == 0
    with caplog.at_level(logging.INFO, logger="ia3_trainer"):
        assert main(["train", killed_recipe, "--resume"]) == 0
    resumed_from = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming from")]
    assert resumed_from == [f"Resuming from {newest}"]

    final = f"checkpoint-{RUN['training.max_steps']}"
    assert global_step(killed_dir / final) == global_step(tmp_path / "whole" / final) == RUN["training.max_steps"]
    expected, got = adapter(tmp_path / "whole"), adapter(killed_dir)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    assert not torch.equal(got[name], at_kill[name]), "the resumed run did not train"


class CrashOnSave(IA3Seq2SeqTrainer):
    """Dies while writing the checkpoint of `crash_step`, after its adapter and optimizer are written."""

    crash_step = 4

    def _save_rng_state(self, output_dir):
        if self.state.global_step == self.crash_step:
            raise RuntimeError("simulated crash during a save")
        super()._save_rng_state(output_dir)


def test_crash_during_save_leaves_no_checkpoint_that_looks_whole(tmp_path):
    raw = tiny_recipe(tmp_path, **{**RUN, "training.max_steps": 6, "training.save_steps": 2,
                                   "training.save_total_limit": None})
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        CrashOnSave.from_recipe(raw).train()
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert (out / "tmp-checkpoint-4" / "checkpoint-4" / "optimizer.pt").is_file()  # the half-written one
    assert last_checkpoint(out) == get_last_checkpoint(out) == str(out / "checkpoint-2")

    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    assert trainer.train(resume_from_checkpoint=True).global_step == 6
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for step in (2, 4, 6):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "base-model"}, "base weights in a checkpoint"


def test_half_written_checkpoint_in_place_is_skipped(tmp_path, caplog):
    for step, files in ((3, {"trainer_state.json": "{}"}), (5, {"trainer_state.json": '{"global_st'}), (9, {})):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    (tmp_path / "checkpoint-7").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="ia3_trainer"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"Skipping {tmp_path / name}" for name in ("checkpoint-9", "checkpoint-7", "checkpoint-5")]
    assert last_checkpoint(tmp_path / "missing") is None


def test_resume_without_a_checkpoint_exits_2(tmp_path, capsys):
    path = write_recipe(tmp_path, "fresh", **{"training.max_steps": 1})
    with pytest.raises(SystemExit) as info:
        main(["train", path, "--resume"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ia3-trainer: error: training.output_dir: no checkpoint to resume from in {tmp_path / 'fresh'}; train "
        "without --resume to start over, or set training.save_strategy so that runs save checkpoints")


def test_best_checkpoint_points_at_the_published_folder(tmp_path):
    raw = tiny_recipe(tmp_path, **{
        "training.max_steps": 4, "training.save_strategy": "steps", "training.save_steps": 2,
        "training.eval_strategy": "steps", "training.eval_steps": 2, "training.load_best_model_at_end": True,
        "training.save_total_limit": 1, "data.max_eval_samples": 8,
    })
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best in (str(tmp_path / "out" / "checkpoint-2"), str(tmp_path / "out" / "checkpoint-4"))
    assert os.path.isdir(best)
    assert json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())[
        "best_model_checkpoint"] == best
    assert not list((tmp_path / "out").glob("tmp-*"))


class NanLossAt(IA3Seq2SeqTrainer):
    """A real non-finite loss: the loss of optimizer step `nan_step` is multiplied by nan before backward."""

    nan_step = 4

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step + 1 == self.nan_step else loss


def ia3_vectors(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "ia3_l" in name}


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 6, "training.save_strategy": "steps",
                                   "training.save_steps": 3})
    trainer = NanLossAt.from_recipe(raw)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    assert not isinstance(info.value, RecipeError)  # the recipe may be fine: the loss is what went wrong
    assert str(info.value) == (
        "training.non_finite_loss: loss is nan at step 4; lower training.learning_rate, set training.max_grad_norm "
        "or check the data (or set training.non_finite_loss to 'skip'); the last checkpoint is "
        f"{checkpoint}")
    # The guard decides on the device (no host read per step) and the host reads it at the step's log: the nan
    # step was counted but its update skipped, so the vectors are those of step 3, as checkpointed.
    assert trainer.state.global_step == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    saved = adapter(checkpoint)
    assert all(torch.isfinite(t).all() for t in saved.values())
    now = ia3_vectors(trainer)
    assert all(torch.isfinite(t).all() for t in now.values())
    assert {name.removesuffix(".default") for name in now} == set(saved)
    assert all(torch.equal(now[name], saved[name.removesuffix(".default")]) for name in now)


def test_nan_loss_stops_before_the_next_checkpoint_when_logging_is_rare(tmp_path):
    # Nothing logs between the nan at step 4 and the save at step 6: the save itself reads the flags first, so no
    # checkpoint is written after a non-finite step and the error names the last good one.
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 9, "training.save_strategy": "steps",
                                   "training.save_steps": 3, "training.logging_steps": 100})
    trainer = NanLossAt.from_recipe(raw)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4; .*the last checkpoint is .*checkpoint-3$"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert all(torch.isfinite(t).all() for t in ia3_vectors(trainer).values())


def test_nan_loss_skip_drops_the_batch_and_goes_on(tmp_path, caplog):
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 5, "training.non_finite_loss": "skip"})
    trainer = NanLossAt.from_recipe(raw)
    seen = {}

    class Snapshot(TrainerCallback):  # the IA3 vectors after each optimizer step
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = ia3_vectors(trainer)

    trainer.add_callback(Snapshot())
    with caplog.at_level(logging.WARNING, logger="ia3_trainer"):
        result = trainer.train()
    assert result.global_step == 5
    assert [r.getMessage() for r in caplog.records if "non_finite_loss" in r.getMessage()] == [
        "training.non_finite_loss: loss is nan at step 4; skipped that optimizer step"]
    logged = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    assert math.isnan(logged[4]) and all(math.isfinite(logged[step]) for step in (1, 2, 3, 5))
    for step in range(1, 6):
        assert all(torch.isfinite(t).all() for t in seen[step].values()), step
    for name in seen[3]:
        assert torch.equal(seen[4][name], seen[3][name]), "the nan batch changed the weights"
        assert not torch.equal(seen[5][name], seen[4][name])
    assert math.isfinite(result.training_loss)


class NanGradient(torch.autograd.Function):
    """The identity forward; a nan gradient backward (a finite loss whose gradients are not)."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class BadMicroBatch(IA3Seq2SeqTrainer):
    """Micro-batch number `bad_call` (1-based) gets a nan loss or, with `bad_gradient`, a finite loss and nan
    gradients; `returned` keeps what each training step gave Trainer to log."""

    bad_call, bad_gradient = 8, False

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls != self.bad_call:
            return loss
        return NanGradient.apply(loss) if self.bad_gradient else loss * float("nan")

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.returned = [*getattr(self, "returned", []), float(loss)]
        return loss


@pytest.mark.parametrize(("accumulation", "bad_gradient", "message"), [
    (2, False, "loss is nan at step 4"), (1, True, "gradients are not finite at step 4"),
    (2, True, "gradients are not finite at step 4")], ids=["accumulated-nan-loss", "nan-gradient", "both"])
def test_skip_leaves_what_a_skipped_step_logged_out_of_the_means(tmp_path, caplog, accumulation, bad_gradient,
                                                                   message):
    # The skipped step 4 logged a finite loss: its first micro-batch's, or its own when only the gradients were not
    # finite. The logged means are those of the four applied steps.
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 5, "training.logging_steps": 5, "training.bf16": False,
                                   "training.non_finite_loss": "skip", "training.per_device_train_batch_size": 4,
                                   "training.gradient_accumulation_steps": accumulation})
    trainer = BadMicroBatch.from_recipe(raw)
    trainer.bad_call, trainer.bad_gradient = 4 * accumulation, bad_gradient
    with caplog.at_level(logging.WARNING, logger="ia3_trainer"):
        result = trainer.train()
    assert f"training.non_finite_loss: {message}; skipped that optimizer step" in caplog.text
    per_step = [sum(trainer.returned[i:i + accumulation]) for i in range(0, 5 * accumulation, accumulation)]
    assert per_step[3] > 0  # the skipped step added to Trainer's loss sum
    applied = (per_step[:3] + per_step[4:])
    (logged,) = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(sum(applied) / 4, rel=1e-5)
    assert result.training_loss == pytest.approx(sum(applied) / 4, rel=1e-5)


def _two_process_guard(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from ia3_trainer.training.guard import NonFiniteGuard

    guard = NonFiniteGuard("skip", step=lambda: 1, last_checkpoint=lambda: None)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard.attach(optimizer)
    before = param.detach().clone()
    # Step 1, two micro-batches: process 0 logs 1 + (nan -> 0), process 1 logs 0.5 + 2. Step 2: 3 on each.
    for loss in ((1.0, float("nan")), (0.5, 2.0))[rank]:
        guard.observe(torch.tensor(loss))
    param.grad = torch.ones(4)
    optimizer.step()
    unchanged = torch.equal(param.detach(), before)
    guard.observe(torch.tensor(3.0))
    param.grad = torch.ones(4)
    optimizer.step()
    guard.check()
    logs = {"loss": (4.0 + 5.5) / 2 / 2, "train_loss": (4.0 + 5.5) / 2 / 2}  # Trainer: the process mean, per step
    guard.correct(logs)
    results.put((rank, unchanged, guard.total, logs))
    torch.distributed.destroy_process_group()


def test_skip_under_ddp_leaves_every_process_loss_of_a_skipped_step_out_of_the_means():
    import torch.multiprocessing as mp

    from conftest import free_port

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_two_process_guard, args=(free_port(), results), nprocs=2, start_method="spawn")
    got = sorted(results.get() for _ in range(2))
    # Both processes skipped step 1 together; the mean is step 2's, 3.0, on both.
    assert got == [(rank, True, 1, {"loss": 3.0, "train_loss": 3.0}) for rank in (0, 1)]


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_train_again_after_a_non_finite_stop_starts_with_a_clean_guard(tmp_path, optim):
    # A notebook: the nan stops the run, the user fixes the cause and calls train() again on the same trainer. Not
    # fused, the guard reads the host before each step and raised inside the optimizer's pre-hook, leaving that
    # step's flag pending; fused, the stopped run's skipped step stayed in the counts that correct the logged means.
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 3, "training.optim": optim,
                                   "training.overwrite_output_dir": True, "training.bf16": False})
    trainer = NanLossAt.from_recipe(raw)
    trainer.nan_step = 2
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2"):
        trainer.train()
    trainer.nan_step = None
    result = trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(math.isfinite(loss) for loss in logged)
    assert result.training_loss == pytest.approx(sum(logged) / 3, rel=1e-4)


def test_the_guard_works_with_a_grad_scaler_and_a_new_optimizer():
    # fp16 on a GPU: accelerate's GradScaler sets the optimizer's found_inf itself, skips overflow steps by design,
    # and deletes found_inf after the step. The guard adds only a non-finite loss to it, and deletes nothing.
    from ia3_trainer.training.guard import NonFiniteGuard

    steps = []
    guard = NonFiniteGuard("stop", step=lambda: len(steps) + 1, last_checkpoint=lambda: None)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for loss_scale in (1.0, float("inf")):  # a finite step, then an fp16-style gradient overflow
        loss = (param * loss_scale).sum()
        guard.observe(loss if loss_scale == 1.0 else torch.tensor(1.0))  # the loss itself is finite
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # raised AttributeError when the guard deleted the scaler's found_inf
        scaler.update()
        optimizer.zero_grad()
        steps.append(1)
    guard.check()  # the overflow was the scaler's to skip: no error
    assert torch.isfinite(param).all() and scaler.get_scale() < 2.0**16
    # A non-finite loss under the scaler still stops.
    guard.observe(torch.tensor(float("nan")))
    (param.sum() * 1.0).backward()
    scaler.step(optimizer)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        guard.check()
    # A new optimizer (Trainer builds another with auto_find_batch_size) is hooked too; the old one is let go.
    other = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard.attach(other)
    before = param.detach().clone()
    guard.observe(torch.tensor(float("inf")))
    param.grad = torch.ones(4)
    other.step()
    assert torch.equal(param.detach(), before) and not hasattr(other, "found_inf")


def test_a_step_the_grad_scaler_skipped_does_not_carry_its_flag_to_the_next_step(caplog):
    # With a non-fused optimizer GradScaler never calls optimizer.step() after an overflow, so the guard's hooks do
    # not run; the step's end (Trainer's on_step_end) closes its record, and the next, finite step is applied.
    from ia3_trainer.training.guard import NonFiniteGuard

    guard = NonFiniteGuard("skip", step=lambda: 99, last_checkpoint=lambda: None)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, foreach=False)
    guard.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu")
    for step, value in ((1, float("nan")), (2, 1.0)):
        before = param.detach().clone()
        loss = (param * value).sum()
        guard.observe(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        guard.step_end(step)
        assert torch.equal(param.detach(), before) == (step == 1), step  # the nan step skipped, the next applied
    with caplog.at_level(logging.WARNING, logger="ia3_trainer"):
        guard.check()
    assert "loss is nan at step 1; skipped that optimizer step" in caplog.text
    assert guard.steps_total == 2 and guard.total == 1
