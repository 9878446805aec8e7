"""CPU threads: a small model on the CPU trains and evaluates on one intra-op thread unless the user chose a number;
the count is restored afterwards."""

import pytest
import torch
from transformers import TrainerCallback

from ia3_trainer import IA3Seq2SeqTrainer
from ia3_trainer.modeling import threads
from ia3_trainer.modeling.threads import cpu_threads, default_threads

from conftest import tiny_recipe


@pytest.fixture
def torch_default(monkeypatch):
    """torch at the thread count it picks by itself, with no thread variable set (the suite runs on one thread)."""
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    default = max(default_threads())
    if default == 1:
        pytest.skip("one usable CPU: there is no second thread to leave out")
    before = torch.get_num_threads()
    torch.set_num_threads(default)
    yield default
    torch.set_num_threads(before)


def inside(model, device) -> int:
    with cpu_threads(model, device):
        return torch.get_num_threads()


def test_a_small_model_on_the_cpu_runs_on_one_thread_then_the_count_is_restored(torch_default, tiny_t5):
    assert inside(tiny_t5, torch.device("cpu")) == 1
    assert torch.get_num_threads() == torch_default
    with pytest.raises(RuntimeError), cpu_threads(tiny_t5, "cpu"):
        raise RuntimeError("a failed step")
    assert torch.get_num_threads() == torch_default


def test_the_users_choice_wins(torch_default, tiny_t5, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch_default))
    assert inside(tiny_t5, "cpu") == torch_default
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(torch_default + 1)  # torch.set_num_threads before the run
    assert inside(tiny_t5, "cpu") == torch_default + 1


def test_a_large_model_or_an_accelerator_keeps_torchs_threads(torch_default, tiny_t5, monkeypatch):
    assert inside(tiny_t5, torch.device("cuda")) == torch_default
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", threads.parameter_count(tiny_t5))
    assert inside(tiny_t5, "cpu") == torch_default


class RecordThreads(TrainerCallback):
    def __init__(self):
        self.seen = set()

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.add(torch.get_num_threads())

    def on_evaluate(self, args, state, control, **kwargs):
        self.seen.add(torch.get_num_threads())


def test_training_and_evaluating_the_tiny_recipe_use_one_thread(torch_default, tmp_path):
    record = RecordThreads()
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 2}), callbacks=[record])
    trainer.train()
    assert record.seen == {1} and torch.get_num_threads() == torch_default
    trainer.evaluate()
    assert record.seen == {1} and torch.get_num_threads() == torch_default


def test_predicting_with_a_small_adapter_uses_one_thread(torch_default, tmp_path):
    from ia3_trainer import IA3Predictor

    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1}))
    trainer.train()
    predictor = IA3Predictor.from_trainer(trainer)
    seen = set()
    encoder = predictor.model.get_base_model().get_encoder()
    hook = encoder.register_forward_pre_hook(lambda module, args: seen.add(torch.get_num_threads()))
    try:
        assert len(predictor.predict(["Sales rose.", "Profit fell."])) == 2
    finally:
        hook.remove()
    assert seen == {1} and torch.get_num_threads() == torch_default
