"""CUDA paths: compiled blocks (CUDA graphs) train like eager, resume to the same adapter, and keep the non-finite
guarantee. Skipped without CUDA; run them on a GPU machine with `python -m pytest -m gpu`."""

import pytest
import torch

from ia3_trainer import IA3Seq2SeqTrainer, IA3TrainingArguments

from conftest import tiny_recipe


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BF16 = {"rel": 3e-2, "abs": 3e-2}  # bf16 tolerance: 8 bits of mantissa


def cuda_recipe(tmp_path, **overrides):
    return tiny_recipe(tmp_path, **{"training.use_cpu": False, "training.max_steps": 8, "training.logging_steps": 1,
                                    "training.bf16": True, **overrides})


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def vectors(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters() if "ia3_l" in n}


def test_defaults_on_cuda(tmp_path):
    args = IA3TrainingArguments(output_dir=str(tmp_path))
    assert args.device.type == "cuda" and args.bf16 is False  # measured: dispatch-bound, bf16 only adds casts
    assert args.fused_kernels is True
    compiled = IA3TrainingArguments(output_dir=str(tmp_path), compile_blocks=True)
    assert compiled.bf16 is torch.cuda.is_bf16_supported()


def test_compiled_blocks_train_to_the_same_losses(tmp_path):
    eager = IA3Seq2SeqTrainer.from_recipe(cuda_recipe(tmp_path / "eager"))
    eager.train()
    compiled = IA3Seq2SeqTrainer.from_recipe(cuda_recipe(tmp_path / "graphs", **{"training.compile_blocks": True}))
    assert compiled.compiled_blocks is not None and compiled.compiled_blocks.count == 4
    compiled.train()
    assert losses(compiled) == pytest.approx(losses(eager), **BF16)
    for name, value in vectors(compiled).items():
        torch.testing.assert_close(value, vectors(eager)[name], **{"rtol": 3e-2, "atol": 3e-2})
    assert compiled.evaluate()["eval_loss"] == pytest.approx(eager.evaluate()["eval_loss"], **BF16)


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_resume_gives_the_uninterrupted_adapter(tmp_path, compile_blocks):
    overrides = {"training.compile_blocks": compile_blocks, "training.save_strategy": "steps",
                 "training.save_steps": 4, "training.bf16": False}  # fp32: resumed and straight runs agree closely
    from transformers import TrainerCallback

    class StopAfter4(TrainerCallback):  # an interruption: the run ends after checkpoint-4 is written
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    straight = IA3Seq2SeqTrainer.from_recipe(cuda_recipe(tmp_path / "straight", **overrides))
    straight.train()
    first = IA3Seq2SeqTrainer.from_recipe(cuda_recipe(tmp_path / "resumed", **overrides), callbacks=[StopAfter4()])
    first.train()
    assert first.state.global_step == 4 and (tmp_path / "resumed" / "out" / "checkpoint-4").is_dir()
    resumed = IA3Seq2SeqTrainer.from_recipe(cuda_recipe(tmp_path / "resumed", **overrides))
    resumed.train(resume_from_checkpoint=True)
    for name, value in vectors(resumed).items():
        torch.testing.assert_close(value, vectors(straight)[name], rtol=1e-4, atol=1e-5)


class NanLossAt(IA3Seq2SeqTrainer):
    nan_step = 3

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step + 1 == self.nan_step else loss


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_a_nan_step_never_reaches_the_vectors(tmp_path, compile_blocks):
    seen = {}
    trainer = NanLossAt.from_recipe(cuda_recipe(tmp_path, **{"training.non_finite_loss": "skip",
                                                             "training.compile_blocks": compile_blocks}))

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = vectors(trainer)

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer.non_finite_guard.on_device  # the fused AdamW skipped the update on the GPU, no host read
    for name in seen[2]:
        assert torch.equal(seen[3][name], seen[2][name]), "the nan step changed the vectors"
        assert torch.isfinite(seen[8][name]).all() and not torch.equal(seen[4][name], seen[3][name])


def test_fused_modules_match_on_cuda():
    from transformers import MT5Config, MT5ForConditionalGeneration

    from ia3_trainer.modeling.kernels import fuse_modules

    torch.manual_seed(0)
    config = MT5Config(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=4, num_decoder_layers=4,
                       vocab_size=512, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = MT5ForConditionalGeneration(config).cuda().eval()
    fused = MT5ForConditionalGeneration(config).cuda().eval()
    fused.load_state_dict(model.state_dict())
    fuse_modules(fused)
    ids, decoder = torch.randint(3, 512, (4, 30), device="cuda"), torch.randint(3, 512, (4, 3), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, decoder_input_ids=decoder).logits,
                                   model(input_ids=ids, decoder_input_ids=decoder).logits, atol=1e-4, rtol=1e-4)
