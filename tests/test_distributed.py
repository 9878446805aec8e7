"""Two CPU processes (gloo) through `accelerate launch`: both train, the batch is split, each example is scored once.

On a machine without GPUs, `accelerate launch --cpu --num_processes 2` starts one process (several CPU processes need
mpirun); `--multi_gpu` runs torchrun, and with `training.use_cpu: true` that gives two gloo processes
(`DistributedType.MULTI_CPU`). The README documents the same command.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from peft import AutoPeftModelForSeq2SeqLM

from ia3_trainer import IA3Seq2SeqTrainer, IA3TrainingArguments, load_recipe
from ia3_trainer.data.preparation import prepare_data

from conftest import free_port, tiny_recipe
from hub_server import FAKE_TOKEN, HubServer


PROCESSES, BATCH, EPOCHS, TRAIN, EVAL = 2, 4, 2, 64, 7  # 7 eval examples: not a multiple of 2 processes x batch 2


@pytest.mark.slow
def test_two_processes_train_one_adapter_and_count_each_eval_example_once(tmp_path, tokenizer):
    hub = HubServer().__enter__()  # the fake Hub on 127.0.0.1: only the main process may push
    raw = tiny_recipe(tmp_path, **{
        "hub.repo_id": "alice/tiny-ia3-ddp",
        "data.validation_size": EVAL, "data.max_eval_samples": None, "data.max_train_samples": TRAIN,
        "training.max_steps": -1, "training.num_train_epochs": EPOCHS, "training.per_device_train_batch_size": BATCH,
        "training.per_device_eval_batch_size": 2, "training.save_strategy": "steps", "training.save_steps": 8,
        "training.include_num_input_tokens_seen": "non_padding", "training.disable_tqdm": True,
        "training.logging_steps": 4, "training.ddp_find_unused_parameters": False,
    })
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no",
               "-m", "ia3_trainer", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": FAKE_TOKEN,
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}  # the fake Hub is reachable whatever the caller set
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    finally:
        hub.__exit__(None, None, None)
    assert result.returncode == 0, result.stderr[-3000:]
    creates = [r for r in hub.requests if r["method"] == "POST" and r["path"] == "/api/repos/create"]
    assert len(creates) == 2  # the main process's: at train begin and before its one push; never rank 1's
    final_step = EPOCHS * TRAIN // (BATCH * PROCESSES)
    assert [c["message"] for c in hub.commits] == [f"Upload final adapter (step {final_step})"]

    # Only the main process prints, saves and writes metrics: one adapter, one summary.
    out = tmp_path / "out"
    assert result.stdout.count("trainable params:") == 1
    assert result.stdout.count(f"saved to {out}") == 1
    assert len(list(out.glob("**/adapter_model.safetensors"))) == 1 + len(list(out.glob("checkpoint-*")))

    # Both processes trained: each wrote its RNG state into the checkpoint, and the global batch is
    # per_device_train_batch_size x processes: 64 examples make 8 steps an epoch, each example seen once an epoch.
    steps = EPOCHS * TRAIN // (BATCH * PROCESSES)
    checkpoint = out / f"checkpoint-{steps}"
    assert {p.name for p in checkpoint.glob("rng_state*")} == {f"rng_state_{rank}.pth" for rank in range(PROCESSES)}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    recipe = load_recipe(raw)
    prepared = prepare_data(recipe.data, tokenizer)
    assert len(prepared.train_dataset) == TRAIN and len(prepared.eval_dataset) == EVAL
    tokens = sum(len(ids) for ids in prepared.train_dataset["input_ids"])
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["num_input_tokens_seen"] == EPOCHS * tokens

    # Evaluation gathered each of the 7 examples exactly once: the same numbers as one process on the saved adapter.
    model = AutoPeftModelForSeq2SeqLM.from_pretrained(out)
    args = IA3TrainingArguments(output_dir=str(tmp_path / "single"), per_device_eval_batch_size=2, use_cpu=True,
                                report_to="none", save_final_adapter=False)
    single = IA3Seq2SeqTrainer(model, args, eval_dataset=prepared.eval_dataset, processing_class=tokenizer,
                               candidate_labels=prepared.label_names, max_new_tokens=prepared.max_label_tokens)
    expected = single.evaluate()
    assert 0 < expected["eval_label_accuracy"] < 1, "pick a run whose accuracy a duplicate would change"
    assert metrics["eval_label_accuracy"] * EVAL == pytest.approx(round(metrics["eval_label_accuracy"] * EVAL))
    assert metrics["eval_label_accuracy"] == pytest.approx(expected["eval_label_accuracy"])
    assert metrics["eval_perplexity"] == pytest.approx(expected["eval_perplexity"], rel=1e-3)  # batching noise: 1e-5
    assert math.isfinite(metrics["train_loss"])
