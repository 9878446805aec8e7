"""IA3Seq2SeqTrainer end to end on tiny models built from configs: only IA3 vectors train, metrics are exact."""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSeq2SeqLM, IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSeq2SeqLM,
    BartForConditionalGeneration,
    MT5ForConditionalGeneration,
    T5ForConditionalGeneration,
)

from ia3_trainer import IA3Seq2SeqTrainer, IA3TrainingArguments, load_recipe
from ia3_trainer.data.encoding import build_collator
from ia3_trainer.data.preparation import prepare_data
from ia3_trainer.evaluation.metrics import decode, label_accuracy

from conftest import TINY_MODEL_DIR, generate_one_by_one, rank_one_by_one, tiny_config, tiny_recipe


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_only_ia3_moved(before, model):
    moved = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    ia3 = {name for name, _ in model.named_parameters() if "ia3_l" in name}
    assert ia3 and moved, "training changed nothing"
    assert moved <= ia3, f"base weights changed: {sorted(moved - ia3)[:3]}"


def test_from_recipe_trains_only_the_ia3_vectors(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 3}))
    before = snapshot(trainer.model)
    metrics = trainer.train().metrics
    assert_only_ia3_moved(before, trainer.model)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert "train_perplexity" in metrics and logged and all("perplexity" in entry for entry in logged)


def test_evaluate_matches_a_direct_computation(tmp_path):
    # fp32, so that batched evaluation and the one-by-one computation below agree to 1e-4
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 6, "training.bf16": False,
                                                                      "training.per_device_eval_batch_size": 5}))
    trainer.train()
    metrics = trainer.evaluate()
    assert set(metrics) >= {"eval_loss", "eval_perplexity", "eval_label_accuracy"}

    model, tokenizer = trainer.model.eval(), trainer.processing_class
    collate = build_collator(tokenizer, model)
    candidates = trainer.candidate_labels
    assert candidates == ["negative", "neutral", "positive"]
    nll, tokens = 0.0, 0
    for row in trainer.eval_dataset:  # one example at a time: no padding anywhere
        batch = collate([row])
        with torch.no_grad():
            logits = model(**batch).logits
            nll += torch.nn.functional.cross_entropy(logits[0], batch["labels"][0], reduction="sum").item()
        tokens += len(row["labels"])
    generated, gold = generate_one_by_one(trainer)
    ranked = rank_one_by_one(trainer)
    correct = sum(g == r for g, r in zip(generated, gold, strict=True))
    ranked = sum(c == r for c, r in zip(ranked, gold, strict=True))
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert metrics["eval_label_accuracy"] == pytest.approx(correct / len(trainer.eval_dataset))
    assert metrics["eval_rank_accuracy"] == pytest.approx(ranked / len(trainer.eval_dataset))
    assert metrics["eval_generate_runtime"] > 0 and metrics["eval_rank_runtime"] > 0
    assert trainer.max_new_tokens == 2  # one label token + EOS: generation is bounded by the longest label


def test_evaluation_does_only_the_work_its_metrics_need(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"eval.metrics": ["perplexity"]}))
    metrics = trainer.evaluate()
    assert "eval_perplexity" in metrics and "eval_label_accuracy" not in metrics
    assert "eval_generate_runtime" not in metrics and "eval_rank_runtime" not in metrics
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"eval.metrics": ["rank_accuracy"]}))
    metrics = trainer.evaluate()
    assert "eval_rank_accuracy" in metrics and "eval_generate_runtime" not in metrics


def test_saved_adapter_reloads_and_predicts_the_same(tmp_path, tiny_t5_dir):
    # fp32: under bf16 the in-memory model keeps its frozen base in bf16, while a reload uses the checkpoint's fp32
    raw = tiny_recipe(tmp_path, **{"model.name_or_path": str(tiny_t5_dir), "model.init": "pretrained",
                                   "training.max_steps": 5, "training.bf16": False})
    trainer = IA3Seq2SeqTrainer.from_recipe(raw)
    trainer.train()  # save_final_adapter: the adapter lands in output_dir without a save_model() call
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, "base weights were saved"
    assert (out / "adapter_model.safetensors").stat().st_size < 100_000
    assert json.loads((out / "recipe.json").read_text())["model"]["name_or_path"] == str(tiny_t5_dir)

    reloaded = AutoPeftModelForSeq2SeqLM.from_pretrained(out).eval()
    batch = build_collator(trainer.processing_class)([{k: row[k] for k in ("input_ids", "attention_mask")}
                                                     for row in trainer.eval_dataset])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained.generate(**batch, max_new_tokens=3)
        got = reloaded.generate(**batch, max_new_tokens=3)
    assert torch.equal(expected, got)


def test_random_init_keeps_its_base_beside_the_adapter(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1}))
    trainer.train()
    out = tmp_path / "out"
    assert (out / "base-model" / "model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base-model").resolve())
    AutoPeftModelForSeq2SeqLM.from_pretrained(out)


@pytest.mark.parametrize("model_type,cls,expected_targets", [
    ("t5", T5ForConditionalGeneration, {"k", "v", "wo"}),
    ("mt5", MT5ForConditionalGeneration, {"k", "v", "wi_1"}),
    ("bart", BartForConditionalGeneration, {"q_proj", "v_proj", "fc2"}),
])
def test_each_architecture_trains_with_peft_defaults(tmp_path, tokenizer, model_type, cls, expected_targets):
    recipe = load_recipe(tiny_recipe(tmp_path))
    prepared = prepare_data(recipe.data, tokenizer)
    args = IA3TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                learning_rate=0.1, use_cpu=True, save_strategy="no", save_final_adapter=False)
    trainer = IA3Seq2SeqTrainer(cls(tiny_config(model_type)), args, train_dataset=prepared.train_dataset,
                                eval_dataset=prepared.eval_dataset, processing_class=tokenizer)
    assert set(trainer.model.peft_config["default"].target_modules) == expected_targets
    before = snapshot(trainer.model)
    trainer.train()
    assert_only_ia3_moved(before, trainer.model)
    metrics = trainer.evaluate()
    predictions, references = generate_one_by_one(trainer)
    assert metrics["eval_label_accuracy"] == pytest.approx(label_accuracy(predictions, references))
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def _mt5_with_separate_head(folder):
    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(tiny_config("mt5"))
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(folder)
    return model


def test_untied_head_survives_tie_weights_and_save(tmp_path, tokenizer):
    original = _mt5_with_separate_head(tmp_path / "mt5")
    tokenizer.save_pretrained(tmp_path / "mt5")
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        expected = original(input_ids=ids, decoder_input_ids=ids).logits

    raw = tiny_recipe(tmp_path, **{"model.name_or_path": str(tmp_path / "mt5"), "model.init": "pretrained",
                                   "ia3.target_modules": None, "ia3.feedforward_modules": None,
                                   "training.bf16": False})  # exact logits: the base stays in fp32

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, decoder_input_ids=ids).logits

    trainer = IA3Seq2SeqTrainer.from_recipe(raw)  # IA3 vectors start at 1: the wrapped model's logits are the same
    trainer.model.get_base_model().tie_weights()
    # Equal up to float rounding: the trainer's fused rms_norm/GELU kernels round differently (~1e-6) from T5's own
    # layers, while a head re-tied to the input embeddings would change the logits entirely (differences of order 1).
    torch.testing.assert_close(logits(trainer.model), expected, rtol=1e-5, atol=1e-5)

    base = IA3Seq2SeqTrainer.load_model(load_recipe(raw))
    assert base.config.tie_word_embeddings is False
    assert torch.equal(logits(base), expected)
    base.tie_weights()
    assert base.lm_head.weight is not base.shared.weight
    assert torch.equal(logits(base), expected)
    base.resize_token_embeddings(base.config.vocab_size)
    assert torch.equal(logits(base), expected)

    base.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(logits(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "again")), expected)


def test_without_the_guard_tie_weights_breaks_the_head(tmp_path):
    # Documents the transformers 5 behaviour the guard exists for; if this ever fails, the guard can go.
    _mt5_with_separate_head(tmp_path / "mt5")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "mt5")
    assert model.config.tie_word_embeddings is True
    model.tie_weights()
    assert model.lm_head.weight is model.shared.weight


def test_bf16_defaults_to_what_was_measured_faster(tmp_path):
    # The CPU's own flags, read independently of torch: native bf16 is AVX512-BF16 or AMX.
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check against")
    native_cpu = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    args = IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert args.bf16 is native_cpu and args.train_sampling_strategy == "group_by_length"
    assert IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=False).bf16 is False
    assert IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True).bf16 is True
    if not torch.cuda.is_available():  # without CUDA and without use_cpu: never bf16 (emulated, slower)
        assert IA3TrainingArguments(output_dir=str(tmp_path)).bf16 is False
        assert IA3TrainingArguments(output_dir=str(tmp_path), compile_blocks=True).bf16 is False


def test_bf16_stores_the_frozen_base_in_bf16_and_ia3_in_fp32(tmp_path, tiny_t5, tokenizer):
    args = IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, max_steps=2,
                                per_device_train_batch_size=4, save_strategy="no", save_final_adapter=False)
    recipe = load_recipe(tiny_recipe(tmp_path))
    prepared = prepare_data(recipe.data, tokenizer)
    trainer = IA3Seq2SeqTrainer(tiny_t5, args, train_dataset=prepared.train_dataset, processing_class=tokenizer,
                                candidate_labels=prepared.label_names)
    dtypes = {name: p.dtype for name, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "ia3_l" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "ia3_l" not in n} == {torch.bfloat16}
    before = snapshot(trainer.model)
    trainer.train()
    assert_only_ia3_moved(before, trainer.model)
    metrics = trainer.evaluate(prepared.eval_dataset)  # generation and ranking reuse the encoding in bf16
    predicted = trainer.predict(prepared.eval_dataset)  # the same pass again: the metrics follow its predictions
    expected = label_accuracy(decode(predicted.predictions, tokenizer), decode(predicted.label_ids, tokenizer))
    assert metrics["eval_label_accuracy"] == pytest.approx(expected)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_mt0_large_shape_counts_like_the_guide():
    from transformers import MT5Config

    config = MT5Config(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
                       num_heads=16, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = MT5ForConditionalGeneration(config)
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))  # as loaded: untied
    peft_model = IA3Seq2SeqTrainer.wrap_model_with_ia3(model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (trainable, total) == (282_624, 1_229_863_936)
    assert model.config.tie_word_embeddings is False


def test_construction_errors(tiny_t5, tokenizer):
    with pytest.raises(TypeError, match="peft_config must be a peft.IA3Config, got LoraConfig"):
        IA3Seq2SeqTrainer(tiny_t5, processing_class=tokenizer, peft_config=LoraConfig())
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel or a peft PeftModel, got str"):
        IA3Seq2SeqTrainer("t5-small", processing_class=tokenizer)
    with pytest.raises(ValueError, match="needs processing_class"):
        IA3Seq2SeqTrainer(tiny_t5)
    peft_model = get_peft_model(tiny_t5, IA3Config(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="You passed a PeftModel together with peft_config"):
        IA3Seq2SeqTrainer(peft_model, processing_class=tokenizer, peft_config=IA3Config())


def test_lora_peft_model_is_refused(tiny_t5, tokenizer):
    lora = get_peft_model(tiny_t5, LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"]))
    with pytest.raises(ValueError, match="trains IA3 adapters, but the PeftModel has a LORA adapter"):
        IA3Seq2SeqTrainer(lora, processing_class=tokenizer)


def test_ready_peft_model_and_config_without_task_type(tiny_t5, tokenizer, tmp_path):
    args = IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    trainer = IA3Seq2SeqTrainer(tiny_t5, args, processing_class=tokenizer, peft_config=IA3Config())
    assert type(trainer.model).__name__ == "PeftModelForSeq2SeqLM"
    ready = get_peft_model(T5ForConditionalGeneration(tiny_config("t5")), IA3Config(task_type="SEQ_2_SEQ_LM"))
    assert IA3Seq2SeqTrainer(ready, args, processing_class=tokenizer).model is ready
    assert isinstance(ready, PeftModel)


def test_architecture_without_peft_default_takes_ia3_trainer_default(tokenizer):
    from transformers import MBartConfig, MBartForConditionalGeneration

    config = MBartConfig(vocab_size=512, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16)
    trainer = IA3Seq2SeqTrainer(MBartForConditionalGeneration(config), processing_class=tokenizer)
    assert trainer.model.peft_config["default"].target_modules == {"k_proj", "v_proj", "fc2"}  # architectures.py


def test_unloadable_model_is_a_recipe_error(tmp_path):
    from ia3_trainer import RecipeError

    raw = tiny_recipe(tmp_path, **{"model.name_or_path": str(tmp_path / "no-such-model"), "model.init": "pretrained",
                                   "model.tokenizer_name_or_path": str(TINY_MODEL_DIR)})
    with pytest.raises(RecipeError, match=r"^model.name_or_path: cannot load a seq2seq model from '.*no-such-model'"):
        IA3Seq2SeqTrainer.from_recipe(raw)


def test_inferred_label_set_is_saved_for_predict_and_evaluate(tmp_path):
    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"data.label_names": None,
                                                                      "training.max_steps": 1}))
    assert trainer.candidate_labels == ["negative", "neutral", "positive"]
    trainer.train()
    # The recipe is saved as given; what training found in the data goes beside it, in inference.json.
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["data"]["label_names"] is None
    inference = json.loads((tmp_path / "out" / "inference.json").read_text())
    assert inference == {"label_names": ["negative", "neutral", "positive"], "max_new_tokens": trainer.max_new_tokens,
                         "encode": "default"}

    from ia3_trainer import IA3Predictor

    settings = IA3Predictor.from_pretrained(tmp_path / "out").settings
    assert (settings.label_names, settings.max_new_tokens) == (trainer.candidate_labels, trainer.max_new_tokens)


def loss_batch(tokenizer, model):
    texts = ["Sales rose by 12 % .", "Juniper Retail is based in Tampere .", "Profit fell ."]
    rows = [{"input_ids": tokenizer(text)["input_ids"], "labels": tokenizer(text_target=label)["input_ids"]}
            for text, label in zip(texts, ["positive", "neutral", "negative sentiment"], strict=True)]
    return build_collator(tokenizer, model)(rows)


def test_label_smoothing_is_transformers_definition_with_the_token_normalisation(tmp_path, tiny_t5, tokenizer):
    from transformers.trainer_pt_utils import LabelSmoother

    args = IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False,
                                label_smoothing_factor=0.2)
    trainer = IA3Seq2SeqTrainer(tiny_t5, args, processing_class=tokenizer)
    batch = loss_batch(tokenizer, trainer.model)
    tokens = int((batch["labels"] != -100).sum())
    smoothed, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    expected = LabelSmoother(epsilon=0.2)(outputs, batch["labels"])  # transformers' own smoothed loss
    torch.testing.assert_close(smoothed, expected, rtol=1e-5, atol=1e-6)
    # Within an optimizer step the token sum is divided by the step's label tokens, smoothed or not.
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch, num_items_in_batch=2 * tokens),
                               smoothed / 2, rtol=1e-5, atol=1e-6)
    trainer.args.label_smoothing_factor = 0.0
    plain = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1),
                                                                        batch["labels"].flatten()))
    assert abs(float((smoothed - plain).detach())) > 1e-3, "label_smoothing_factor changed nothing"
    # A smoothed loss is no token NLL: no perplexity is logged next to it.
    trainer.log({"loss": 1.0})
    trainer.args.label_smoothing_factor = 0.2
    trainer.log({"loss": 1.0})
    first, second = trainer.state.log_history[-2:]
    assert first["perplexity"] == pytest.approx(math.e) and "perplexity" not in second


def test_a_compute_loss_func_replaces_the_cross_entropy(tmp_path, tiny_t5, tokenizer):
    calls = []

    def squared_logits(outputs, labels, num_items_in_batch=None):
        calls.append((labels.shape, num_items_in_batch))
        return outputs.logits.float().pow(2).sum() / (num_items_in_batch or (labels != -100).sum())

    args = IA3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False)
    trainer = IA3Seq2SeqTrainer(tiny_t5, args, processing_class=tokenizer, compute_loss_func=squared_logits)
    batch = loss_batch(tokenizer, trainer.model)
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True, num_items_in_batch=7)
    assert calls == [(batch["labels"].shape, 7)]
    torch.testing.assert_close(loss, outputs.logits.float().pow(2).sum() / 7)
    trainer.log({"loss": 1.0})
    assert "perplexity" not in trainer.state.log_history[-1]


def test_saves_pass_peft_their_option_and_leave_the_model_as_peft_made_it(tmp_path):
    from ia3_trainer.modeling.loading import saving_adapter_only

    trainer = IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1}))
    trainer.train()
    model = trainer.model
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "save_pretrained" not in vars(model)  # peft's own method, as for any PeftModel
    with saving_adapter_only(model):
        assert model.save_pretrained.keywords == {"save_embedding_layers": False}
        model.save_pretrained(tmp_path / "saved")
    assert "save_pretrained" not in vars(model) and (tmp_path / "saved" / "adapter_config.json").is_file()
