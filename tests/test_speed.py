"""The dispatch-bound regime on a CPU: dispatched ops per step for mt0-large's depth, no host read per step, fused
modules that change no result, and regional compilation that changes no loss (issue #10)."""

import sys
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import MT5Config, MT5ForConditionalGeneration, set_seed

from ia3_trainer import IA3Seq2SeqTrainer, IA3TrainingArguments
from ia3_trainer.modeling.kernels import compile_blocks, fuse_modules

from conftest import REPO, tiny_recipe


sys.path.insert(0, str(REPO / "benchmarks"))
from measure import count_step_ops  # noqa: E402


# mt0-large's depth and layout (24+24 gated-gelu layers, 16 heads of 64 -> here 4 of 16) at width 64: the same ops a
# step as the real model, which benchmarks/throughput.py --ops-only counts the same way.
THIN_MT0 = dict(d_ff=128, d_kv=16, d_model=64, num_heads=4, num_layers=24, num_decoder_layers=24, vocab_size=512,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", dropout_rate=0.1, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def thin_mt0(tmp_path_factory):
    set_seed(0)
    folder = tmp_path_factory.mktemp("thin-mt0")
    MT5ForConditionalGeneration(MT5Config(**THIN_MT0)).save_pretrained(folder)
    return folder


def batches(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 40, (n,), generator=generator).tolist()
    return Dataset.from_dict({
        "input_ids": [[*torch.randint(3, 512, (k,), generator=generator).tolist(), 1] for k in lengths],
        "labels": [[int(torch.randint(3, 512, (1,), generator=generator)), 1] for _ in lengths],
    })


def ops_per_step(trainer_cls, args_cls, model_dir, tokenizer, tmp_path, **extra):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq

    args = args_cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=4, learning_rate=1e-3,
                    per_device_train_batch_size=8, save_strategy="no", logging_steps=100, disable_tqdm=True, **extra)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    if trainer_cls is IA3Seq2SeqTrainer:
        trainer = trainer_cls(model, args, train_dataset=batches(), processing_class=tokenizer)
    else:  # what a user writes by hand: peft + Seq2SeqTrainer with library defaults
        model = get_peft_model(model, IA3Config(task_type="SEQ_2_SEQ_LM"))
        trainer = trainer_cls(model=model, args=args, train_dataset=batches(), processing_class=tokenizer,
                              data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
    return count_step_ops(trainer, None, "cpu")


@pytest.mark.slow
def test_the_default_path_dispatches_fewer_ops_than_plain_and_reads_nothing_back(thin_mt0, tokenizer, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    plain = ops_per_step(Seq2SeqTrainer, Seq2SeqTrainingArguments, thin_mt0, tokenizer, tmp_path / "plain")
    # The defaults on CUDA (see IA3TrainingArguments): fp32 and fused modules; no compile (graphs are not counted).
    ia3 = ops_per_step(IA3Seq2SeqTrainer, IA3TrainingArguments, thin_mt0, tokenizer, tmp_path / "ia3", bf16=False,
                       fused_kernels=True)
    assert ia3["ops_per_step"] < plain["ops_per_step"], (ia3["ops_per_step"], plain["ops_per_step"])
    # A host read stalls a GPU's queue. Plain reads the loss back twice a step (logging_nan_inf_filter); the
    # default path does not (what transformers' own modeling code reads, both paths read alike).
    plain_reads, ia3_reads = (result["ops"].get("aten._local_scalar_dense", 0) for result in (plain, ia3))
    assert ia3_reads <= plain_reads - 2, (plain_reads, ia3_reads)


def test_fused_modules_change_no_result(thin_mt0):
    model = MT5ForConditionalGeneration.from_pretrained(thin_mt0).eval()
    fused = MT5ForConditionalGeneration.from_pretrained(thin_mt0).eval()
    assert fuse_modules(fused) == {"rms_norm": 24 * 2 + 24 * 3 + 2, "gelu_tanh": 48}
    assert fused.state_dict().keys() == model.state_dict().keys()
    generator = torch.Generator().manual_seed(0)
    ids, decoder = (torch.randint(3, 512, shape, generator=generator) for shape in ((4, 30), (4, 3)))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, decoder_input_ids=decoder).logits,
                                   model(input_ids=ids, decoder_input_ids=decoder).logits, atol=1e-4, rtol=1e-4)
    # Under bf16 both round differently, and are as far from the fp32 result as each other.
    with torch.no_grad():
        reference = model(input_ids=ids, decoder_input_ids=decoder).logits
        errors = [(m.to(torch.bfloat16)(input_ids=ids, decoder_input_ids=decoder).logits.float() - reference)
                  .abs().mean() for m in (model, fused)]
    assert errors[1] < 1.5 * errors[0]


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def deep_t5(tmp_path_factory):
    """A 10+10-layer T5 config beside the tiny tokenizer: deep enough that a block compiled per layer would exceed
    torch.compile's recompile limit (8), as mt0-large's 24 decoder layers would."""
    from transformers import AutoTokenizer, T5Config

    folder = tmp_path_factory.mktemp("deep-t5")
    T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=10, num_decoder_layers=10, num_heads=4,
             dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO / "recipes" / "assets" / "tiny-t5").save_pretrained(folder)
    return folder


def test_compiled_blocks_train_to_the_same_losses_and_evaluate_eager(tmp_path, deep_t5, caplog):
    import logging

    import torch._dynamo

    raw = tiny_recipe(tmp_path, **{"training.max_steps": 4, "training.bf16": False,
                                   "model.name_or_path": str(deep_t5)})
    eager = IA3Seq2SeqTrainer.from_recipe(raw)
    eager.train()
    torch._dynamo.reset()
    compiled = IA3Seq2SeqTrainer.from_recipe(raw, {"training.output_dir": str(tmp_path / "compiled")})
    # aot_eager traces forward and backward as inductor does, without generating code (inductor takes minutes on a
    # 2-core CPU); training.compile_blocks uses inductor.
    compiled.compiled_blocks = compile_blocks(compiled.model, backend="aot_eager")
    assert compiled.compiled_blocks.count == 20
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        compiled.train()
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-6)
    # One graph for the first block of each stack and one for the others (no cache, no per-layer guard), each
    # static then dynamic in length: 20 blocks, at most 8 graphs, and never the recompile limit.
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < frames <= 8, frames
    assert "recompile_limit" not in caplog.text
    compiled.evaluate()  # generation changes shapes every step: evaluation must not compile anything
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def _broken_forward_compiler(graph, example_inputs):
    raise RuntimeError("no compiler here")


def _broken_backward_compiler():
    from torch._dynamo.backends.common import aot_autograd

    def refuse(graph, example_inputs):
        raise RuntimeError("backward compiler broke")

    return aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=refuse)


@pytest.mark.parametrize(("backend", "reason"), [(_broken_forward_compiler, "no compiler here"),
                                                 (_broken_backward_compiler(), "backward compiler broke")],
                         ids=["forward", "backward"])
def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tmp_path, backend, reason):
    import torch._dynamo

    torch._dynamo.reset()
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 3, "training.bf16": False})
    eager = IA3Seq2SeqTrainer.from_recipe(raw)
    eager.train()
    trainer = IA3Seq2SeqTrainer.from_recipe(raw, {"training.output_dir": str(tmp_path / "fallback")})
    trainer.compiled_blocks = compile_blocks(trainer.model, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "torch.compile of the repeated blocks failed" in str(w.message)]
    assert len(messages) == 1 and reason in messages[0], messages
    assert losses(trainer) == pytest.approx(losses(eager), rel=1e-6)


def _breakable_compiler(where):
    """A backend that compiles (forward and backward, as inductor does, without generating code) until
    `broken["now"]` is set, then fails to compile the forward or the backward."""
    from torch._dynamo.backends.common import aot_autograd

    broken = {"now": False}

    def compiler(part):
        def compile_graph(graph, example_inputs):
            if broken["now"] and part == where:
                raise RuntimeError(f"{where} recompile broke")
            return graph

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward")), broken


class RecompileAt(IA3Seq2SeqTrainer):
    """Before micro-batch `at` every compiled graph is dropped (the blocks compile again, as for a new padded length)
    and `broken["now"]` is set; `fail_once` raises a ValueError at that micro-batch instead, once."""

    at, broken, fail_once = None, None, False

    def compute_loss(self, model, inputs, *args, **kwargs):
        import torch._dynamo

        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.at and self.fail_once:
            raise ValueError("a bad batch")
        if self.calls == self.at and self.broken is not None:
            torch._dynamo.reset()
            self.broken["now"] = True
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_compiler_failing_at_a_later_recompile_falls_back_to_eager(tmp_path, where):
    # Micro-batch 2 is the second of optimizer step 1 (accumulation 2): a backward that fails to compile there must
    # not lose micro-batch 1's gradients when the step runs again eager. (Micro-batch 1 compiled every block.)
    import torch._dynamo

    torch._dynamo.reset()
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 3, "training.bf16": False,
                                   "training.gradient_accumulation_steps": 2})
    eager = IA3Seq2SeqTrainer.from_recipe(raw)
    eager.train()
    trainer = RecompileAt.from_recipe(raw, {"training.output_dir": str(tmp_path / "fallback")})
    backend, trainer.broken = _breakable_compiler(where)
    trainer.at, trainer.compiled_blocks = 2, compile_blocks(trainer.model, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "torch.compile of the repeated blocks failed" in str(w.message)]
    assert len(messages) == 1 and f"{where} recompile broke" in messages[0], messages
    assert not trainer.compiled_blocks.enabled
    assert losses(trainer) == pytest.approx(losses(eager), rel=1e-6)


def _out_of_memory_compiler(graph, example_inputs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("case", ["out of memory", "an error of the step"])
def test_errors_that_are_not_the_compilers_go_through(tmp_path, case):
    import torch._dynamo

    torch._dynamo.reset()
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 2, "training.bf16": False})
    trainer = RecompileAt.from_recipe(raw)
    trainer.at, trainer.fail_once = 1, case == "an error of the step"
    backend = _out_of_memory_compiler if case == "out of memory" else "aot_eager"
    trainer.compiled_blocks = compile_blocks(trainer.model, backend=backend)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(
            (torch.OutOfMemoryError, RuntimeError, ValueError), match="out of memory|a bad batch"):
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "torch.compile of the repeated blocks failed" in str(w.message)]
    assert trainer.compiled_blocks.enabled
