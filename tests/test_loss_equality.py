"""The training loss is a mean over the label tokens of each optimizer step, whatever splits the step (issue 11).

One process with batch 16, two processes with batch 8 and one process with batch 8 and 2 accumulation steps are the
same training: they log the same loss at every step and reach the same adapter. They see the same examples in each
step with `train_sampling_strategy: random`: accelerate replaces the RandomSampler with one seeded by `data_seed`
(else `seed`) and the epoch, the batch sampler cuts that one order into batches, and under DDP process p takes
batches p, p + 2, ... So step k of one process x 16 holds the two processes' k-th batches of 8, and one process x 8
x 2 accumulates the same two batches. (Our default `group_by_length` draws "megabatches" whose size depends on the
per-device batch size, so its steps hold the same examples only by chance.)

The runs use SGD at a constant rate: Adam's first steps divide each gradient by its own magnitude, which turns the
1e-8 differences that padding to 16 instead of 8 tokens leaves into differences of 1e-1 in the adapter.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ia3_trainer import IA3Seq2SeqTrainer
from ia3_trainer.cli.main import main

from conftest import assert_same_adapter, free_port, tiny_recipe


SAME_STEPS = {
    "data.validation_size": 0, "training.train_sampling_strategy": "random", "training.optim": "sgd",
    "training.learning_rate": 1.0, "training.lr_scheduler_type": "constant", "training.logging_steps": 1,
    "training.disable_tqdm": True, "training.ddp_find_unused_parameters": False,
    "training.bf16": False,  # the same arithmetic on every CPU (bf16 turns itself on where the CPU has it)
}


def write_run(tmp_path, name, batch, accumulation, **overrides):
    raw = tiny_recipe(tmp_path / name, **{
        **SAME_STEPS, "training.per_device_train_batch_size": batch,
        "training.gradient_accumulation_steps": accumulation, **overrides,
    })
    (tmp_path / name).mkdir()
    path = tmp_path / name / "recipe.json"
    path.write_text(json.dumps(raw))
    return raw, path


def logged_losses(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.slow
def test_one_process_two_processes_and_accumulation_train_the_same(tmp_path):
    steps = 4  # 64 examples: 4 steps of 16, one epoch
    raw, _ = write_run(tmp_path, "one-x16", 16, 1, **{"training.max_steps": steps})
    _, two_x8 = write_run(tmp_path, "two-x8", 8, 1, **{"training.max_steps": steps})
    _, one_x8x2 = write_run(tmp_path, "one-x8x2", 8, 2, **{"training.max_steps": steps})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "ia3_trainer", "train", str(two_x8)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    try:  # the one-process runs train here meanwhile
        assert main(["train", str(tmp_path / "one-x16" / "recipe.json")]) == 0
        assert main(["train", str(one_x8x2)]) == 0
        _, stderr = launched.communicate(timeout=240)
    finally:
        launched.kill()
    assert launched.returncode == 0, stderr[-3000:]

    runs = {name: tmp_path / name / "out" for name in ("one-x16", "two-x8", "one-x8x2")}
    losses = {name: logged_losses(out) for name, out in runs.items()}
    assert len(losses["one-x16"]) == steps
    for name in ("two-x8", "one-x8x2"):
        assert losses[name] == pytest.approx(losses["one-x16"], rel=1e-5, abs=0), name
    adapters = {name: load_file(out / "adapter_model.safetensors") for name, out in runs.items()}
    assert_same_adapter(adapters["two-x8"], adapters["one-x16"])
    assert_same_adapter(adapters["one-x8x2"], adapters["one-x16"])
    vector = next(iter(adapters["one-x16"].values()))  # IA3 vectors start at ones
    assert not torch.equal(vector, torch.ones_like(vector)), "did not train"

    # Not scaled by the process count (the bug logged about twice the loss under two processes): the first logged
    # loss is the model's own mean token loss over the first 16 examples of the seeded order, on the untrained model.
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["labels"]) == 16
    with torch.no_grad():
        first = trainer.model(**batch).loss.item()  # T5's own mean over every label token of the batch
    assert losses["two-x8"][0] == pytest.approx(first, rel=1e-5)
    assert losses["one-x16"][0] == pytest.approx(first, rel=1e-5)


def test_last_partial_accumulation_step_weighs_each_token_once(tmp_path):
    # 56 examples: one process x 16 takes steps of 16, 16, 16 and 8; one process x 8 x 2 accumulates 2, 2, 2 and 1
    # batches. The last step must be a mean over its 8 examples, not half of one.
    overrides = {"data.max_train_samples": 56, "training.max_steps": -1, "training.num_train_epochs": 1}
    _, one_x16 = write_run(tmp_path, "one-x16", 16, 1, **overrides)
    _, one_x8x2 = write_run(tmp_path, "one-x8x2", 8, 2, **overrides)
    assert main(["train", str(one_x16)]) == 0
    assert main(["train", str(one_x8x2)]) == 0
    expected, got = (logged_losses(tmp_path / name / "out") for name in ("one-x16", "one-x8x2"))
    assert len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-5, abs=0)
    assert_same_adapter(load_file(tmp_path / "one-x8x2" / "out" / "adapter_model.safetensors"),
                        load_file(tmp_path / "one-x16" / "out" / "adapter_model.safetensors"))


def test_compute_loss_outside_the_training_loop_is_the_batch_mean(tmp_path, monkeypatch):
    # Called without num_items_in_batch (a subclass, evaluation code, a test), the loss is this batch's own mean,
    # also under several processes: the process-count factor belongs to the training loop's global token count.
    raw, _ = write_run(tmp_path, "run", 8, 1)
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int((batch["labels"] != -100).sum())
    with torch.no_grad():
        mean = trainer.model(**batch).loss.item()
        monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(mean, rel=1e-6)
        # In the loop, num_items_in_batch counts both processes' tokens (here twice this batch's) and DDP averages
        # the two processes' gradients: each process's loss is its token sum over the global count, times 2.
        in_loop = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(2 * tokens))
        assert in_loop.item() == pytest.approx(mean, rel=1e-6)
