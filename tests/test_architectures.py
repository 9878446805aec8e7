"""IA3 defaults for every text encoder-decoder family: vector counts, training, save and reload, partial matches."""

import pytest
import torch
import transformers

from ia3_trainer.modeling.architectures import (
    IA3_TARGETS,
    PEFT_DEFAULTS,
    build_ia3_config,
    ia3_targets,
    warn_partial_matches,
)

from conftest import tiny_t5_like


VOCAB = 512  # the shipped tiny tokenizer: pad 0, eos 1, unk 2


def _bart_like(cls, **kwargs):
    # Different encoder and decoder feed-forward widths, so the count checks each side's fc2. The default init_std
    # (0.02) gives 16-wide models near-uniform logits, where scaling activations barely moves the loss.
    return cls(**{**dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=24, max_position_embeddings=64,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, decoder_start_token_id=0, init_std=0.3),
                  **kwargs})


def _gemma_stack(**kwargs):
    return {**dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                   bos_token_id=2, initializer_range=0.3), **kwargs}


def _t5gemma2():
    encoder = dict(text_config=_gemma_stack(), mm_tokens_per_image=4, vision_config=dict(
        model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, image_size=32, patch_size=8))
    return transformers.T5Gemma2Config(encoder=encoder, decoder=_gemma_stack(intermediate_size=24), dropout_rate=0.0,
                                       attention_dropout=0.0, initializer_range=0.3)


# The number of IA3 vector entries, from the config alone: layers x widths. A key/value target adds its output
# width, a feed-forward target its input width (the feed-forward dim).
def _t5_count(c):
    inner = c.d_kv * c.num_heads
    return c.num_layers * (2 * inner + c.d_ff) + c.num_decoder_layers * (4 * inner + c.d_ff)


def _switch_count(c):
    inner = c.d_kv * c.num_heads

    def ff(layer, step):  # a sparse layer has one wo per expert (SwitchTransformersStack: layer % step == 1)
        return c.d_ff * (c.num_experts if step > 0 and (layer % step == 1 or step == 1) else 1)

    return (sum(2 * inner + ff(i, c.encoder_sparse_step) for i in range(c.num_layers))
            + sum(4 * inner + ff(i, c.decoder_sparse_step) for i in range(c.num_decoder_layers)))


def _bart_count(c, encoder_kv=2):
    return (c.encoder_layers * (encoder_kv * c.d_model + c.encoder_ffn_dim)
            + c.decoder_layers * (4 * c.d_model + c.decoder_ffn_dim))


def _prophetnet_count(c):
    return (c.num_encoder_layers * (2 * c.hidden_size + c.encoder_ffn_dim)
            + c.num_decoder_layers * (4 * c.hidden_size + c.decoder_ffn_dim))


def _gemma_count(encoder, decoder, decoder_kv):
    def kv(stack):
        return stack.num_key_value_heads * stack.head_dim

    return (encoder.num_hidden_layers * (2 * kv(encoder) + encoder.intermediate_size)
            + decoder.num_hidden_layers * (decoder_kv * kv(decoder) + decoder.intermediate_size))


FAMILIES = {
    "t5": (lambda: tiny_t5_like(transformers.T5Config), _t5_count),
    "mt5": (lambda: tiny_t5_like(transformers.MT5Config, feed_forward_proj="gated-gelu"), _t5_count),  # wi_1: d_ff out
    "umt5": (lambda: tiny_t5_like(transformers.UMT5Config), _t5_count),
    "longt5": (lambda: tiny_t5_like(transformers.LongT5Config), _t5_count),
    "switch_transformers": (lambda: tiny_t5_like(
        transformers.SwitchTransformersConfig, num_experts=2, expert_capacity=8, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, router_jitter_noise=0.0), _switch_count),
    "bart": (lambda: _bart_like(transformers.BartConfig), _bart_count),  # peft's q_proj: as wide as k_proj
    "mbart": (lambda: _bart_like(transformers.MBartConfig), _bart_count),
    "plbart": (lambda: _bart_like(transformers.PLBartConfig), _bart_count),
    "mvp": (lambda: _bart_like(transformers.MvpConfig), _bart_count),
    "marian": (lambda: _bart_like(transformers.MarianConfig), _bart_count),
    "fsmt": (lambda: transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=24,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, decoder_start_token_id=0, init_std=0.3), _bart_count),
    "m2m_100": (lambda: _bart_like(transformers.M2M100Config), _bart_count),
    "pegasus": (lambda: _bart_like(transformers.PegasusConfig), _bart_count),
    "pegasus_x": (lambda: _bart_like(transformers.PegasusXConfig, block_size=4, num_global_tokens=4), _bart_count),
    # original_full: block-sparse attention needs sequences of several 64-token blocks; the names are the same.
    "bigbird_pegasus": (lambda: _bart_like(transformers.BigBirdPegasusConfig, attention_type="original_full"),
                        _bart_count),
    "led": (lambda: _bart_like(transformers.LEDConfig, max_encoder_position_embeddings=64,
                               max_decoder_position_embeddings=64, attention_window=4),
            lambda c: _bart_count(c, encoder_kv=4)),  # key, value, key_global, value_global
    "blenderbot": (lambda: _bart_like(transformers.BlenderbotConfig), _bart_count),
    "blenderbot-small": (lambda: _bart_like(transformers.BlenderbotSmallConfig), _bart_count),
    "prophetnet": (lambda: transformers.ProphetNetConfig(
        vocab_size=VOCAB, hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=24, num_encoder_layers=2,
        num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, ngram=2, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, decoder_start_token_id=0, init_std=0.3), _prophetnet_count),
    "t5gemma": (lambda: transformers.T5GemmaConfig(
        encoder=_gemma_stack(), decoder=_gemma_stack(intermediate_size=24), vocab_size=VOCAB, dropout_rate=0.0,
        attention_dropout=0.0), lambda c: _gemma_count(c.encoder, c.decoder, decoder_kv=4)),  # self + cross
    "t5gemma2": (_t5gemma2, lambda c: _gemma_count(c.encoder.text_config, c.decoder, decoder_kv=2)),  # merged
}


def test_the_table_covers_every_family_and_keeps_peft_defaults():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    assert set(IA3_TARGETS) == set(FAMILIES)
    for model_type in PEFT_DEFAULTS:
        assert IA3_TARGETS[model_type] == (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type],
                                           TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_trains_saves_and_reloads(tmp_path, tokenizer, model_type):
    from datasets import Dataset
    from peft import AutoPeftModelForSeq2SeqLM
    from transformers import AutoModelForSeq2SeqLM, set_seed

    from ia3_trainer import IA3Seq2SeqTrainer, IA3TrainingArguments

    make_config, count = FAMILIES[model_type]
    config = make_config()
    assert config.model_type == model_type
    set_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "base")  # random, but loadable by path
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base")
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "input_ids": [[*torch.randint(3, VOCAB, (n,), generator=generator).tolist(), 1] for n in (5, 7, 6, 8)],
        "labels": [[*torch.randint(3, VOCAB, (n,), generator=generator).tolist(), 1] for n in (2, 3, 2, 3)],
    })
    # One batch of all four examples at each step: step 3 sees the batch step 1 did, after two updates.
    args = IA3TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=3, learning_rate=0.1,
        per_device_train_batch_size=4, logging_steps=1, save_strategy="no", eval_strategy="no",
        save_final_adapter=False, seed=0, dataloader_num_workers=0, bf16=False,  # exact logits: an fp32 base
    )
    trainer = IA3Seq2SeqTrainer(model, args, train_dataset=data, processing_class=tokenizer)
    assert trainer.model.get_nb_trainable_parameters()[0] == count(config)
    assert warn_partial_matches(trainer.model) == []
    # The trainer's loss (decoder inputs built from the labels, token sums over num_items_in_batch) is the token-mean
    # cross-entropy of the model's logits, which is the model's own loss for every family but ProphetNet (whose own
    # loss adds its n-gram streams' future-token predictions; fine-tuning here trains the next-token stream).
    batch = trainer.data_collator([data[i] for i in range(4)])
    with torch.no_grad():
        outputs = trainer.model.eval()(**batch)
        mean = torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1), batch["labels"].flatten())
        ours = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(ours, mean, atol=1e-5, rtol=1e-5)
    if model_type != "prophetnet":
        torch.testing.assert_close(ours, outputs.loss, atol=1e-5, rtol=1e-5)

    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = AutoPeftModelForSeq2SeqLM.from_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 9, 17, 33, 1]])
    decoder_ids = torch.tensor([[0, 7, 11]])
    trained = trainer.model.eval()
    # use_cache=False: a teacher-forced forward, as in training (FSMT drops its causal mask when caching is on,
    # and Trainer turns caching off in the trained model's config only).
    inputs = dict(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False)
    with torch.no_grad():
        expected = trained(**inputs).logits
        actual = reloaded.eval()(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_mt0_large_keeps_peft_mt5_count():
    """mt0-large's real sizes, built on the meta device: peft's mt5 default (k, v, wi_1) gives 282,624 vectors."""
    from peft import get_peft_model

    config = transformers.MT5Config(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                                    num_decoder_layers=24, num_heads=16, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = transformers.MT5ForConditionalGeneration(config)
    peft_model = get_peft_model(model, build_ia3_config(model, {"target_modules": None, "feedforward_modules": None}))
    assert peft_model.get_nb_trainable_parameters()[0] == _t5_count(config) == 282_624


def _tiny(model_type):
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(FAMILIES[model_type][0]())


def test_build_ia3_config_fills_what_is_null(caplog):
    model = _tiny("mbart")
    with caplog.at_level("INFO", logger="ia3_trainer.modeling.architectures"):
        config = build_ia3_config(model, {"target_modules": None, "feedforward_modules": None, "modules_to_save": []})
    assert (config.target_modules, config.feedforward_modules) == ({"k_proj", "v_proj", "fc2"}, {"fc2"})
    assert config.task_type == "SEQ_2_SEQ_LM"
    assert "IA3 (ia3-trainer for mbart): target_modules=['k_proj', 'v_proj', 'fc2']" in caplog.text
    # Targets given, feed-forward null: those of the targets the table marks feed-forward (suffixes count).
    config = build_ia3_config(model, {"target_modules": ["k_proj", "decoder.layers.1.fc2"]})
    assert config.feedforward_modules == {"decoder.layers.1.fc2"}
    assert build_ia3_config(model, {"target_modules": ["k_proj"]}).feedforward_modules == set()
    given = build_ia3_config(model, {"target_modules": ["q_proj", "fc1"], "feedforward_modules": ["fc1"]})
    assert (given.target_modules, given.feedforward_modules) == ({"q_proj", "fc1"}, {"fc1"})
    with pytest.raises(ValueError, match="ia3.feedforward_modules: is set but target_modules is null"):
        build_ia3_config(model, {"feedforward_modules": ["fc2"]})


class _UnknownConfig(transformers.T5Config):
    model_type = "my-seq2seq"


def test_unknown_family_names_its_model_type_and_the_keys_to_set(tokenizer):
    from ia3_trainer import IA3Seq2SeqTrainer

    model = transformers.T5ForConditionalGeneration(tiny_t5_like(_UnknownConfig))
    message = r"model type 'my-seq2seq'; set ia3.target_modules and ia3.feedforward_modules"
    with pytest.raises(ValueError, match=message):
        ia3_targets(model)
    with pytest.raises(ValueError, match=message):
        IA3Seq2SeqTrainer(model, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"ia3.feedforward_modules: is null and model type 'my-seq2seq'"):
        build_ia3_config(model, {"target_modules": ["k", "v"]})
    config = build_ia3_config(model, {"target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]})
    assert config.target_modules == {"k", "v", "wo"}  # named modules work for any family


def _wrap_warnings(model, config) -> list[str]:
    from ia3_trainer import IA3Seq2SeqTrainer

    with pytest.warns(UserWarning) as caught:
        IA3Seq2SeqTrainer.wrap_model_with_ia3(model, config)
    return [str(warning.message) for warning in caught if str(warning.message).startswith("ia3: ")]


def test_partial_match_warns_naming_the_pattern_and_the_layers():
    from peft import IA3Config

    # BigBird's encoder names its key and value self.key and self.value: BART's names adapt the decoder only.
    bart_names = IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])
    messages = _wrap_warnings(_tiny("bigbird_pegasus"), bart_names)
    assert [message.split(" matched")[0] for message in messages] == ["ia3: target module 'k_proj'",
                                                                      "ia3: target module 'v_proj'"]
    assert messages[0].startswith(
        "ia3: target module 'k_proj' matched nothing in 2 of 4 layers (model.encoder.layers.{0,1}), although other "
        "layers have it at self_attn.k_proj: those layers get no IA3 vector there; check ia3.target_modules")
    # A regex that matches the first block of each stack only.
    first_block = IA3Config(target_modules=r".*block\.0\.layer\.0\.SelfAttention\.[kv]", feedforward_modules=[])
    [message] = _wrap_warnings(_tiny("t5"), first_block)
    assert "matched nothing in 2 of 4 layers (encoder.block.1, decoder.block.1)" in message
    # Switch's sparse layers have experts.expert_<i>.wo, not mlp.wo.
    dense_only = IA3Config(target_modules=["k", "v", "mlp.wo"], feedforward_modules=["mlp.wo"])
    [message] = _wrap_warnings(_tiny("switch_transformers"), dense_only)
    assert message.startswith("ia3: target module 'mlp.wo' matched nothing in 2 of 4 layers")


def test_decoder_only_targets_and_skipped_stacks_do_not_warn():
    from peft import IA3Config, get_peft_model

    cross = get_peft_model(_tiny("t5"), IA3Config(target_modules=["EncDecAttention.k"], feedforward_modules=[]))
    assert warn_partial_matches(cross) == []  # cross-attention exists in decoder layers only
    chosen = get_peft_model(_tiny("t5"), IA3Config(target_modules=["k", "v"], exclude_modules=r".*block\.1\..*"))
    assert warn_partial_matches(chosen) == []  # layers left out on purpose
    vision = get_peft_model(_tiny("t5gemma2"), build_ia3_config(_tiny("t5gemma2")))
    names = [name for name, _ in vision.named_modules() if name.endswith("k_proj")]
    assert not any("vision_tower" in name and "ia3_l" in name for name, _ in vision.named_parameters())
    assert any("vision_tower" in name for name in names)  # the vision tower keeps its k_proj, unadapted


def test_recipe_without_targets_takes_the_table(tmp_path):
    from peft import IA3Config

    from ia3_trainer import IA3Seq2SeqTrainer, RecipeError, load_recipe

    from conftest import tiny_recipe

    recipe = load_recipe(tiny_recipe(tmp_path, **{"ia3.target_modules": None, "ia3.feedforward_modules": None}))
    config = IA3Seq2SeqTrainer.build_ia3_config(recipe, _tiny("pegasus"))
    assert (config.target_modules, config.feedforward_modules) == ({"k_proj", "v_proj", "fc2"}, {"fc2"})
    # An IA3Config without targets, given to the trainer, takes the table too (not peft's three-family default).
    wrapped = IA3Seq2SeqTrainer.wrap_model_with_ia3(_tiny("pegasus"), IA3Config(init_ia3_weights=False))
    config = wrapped.peft_config["default"]
    assert (config.target_modules, config.feedforward_modules, config.init_ia3_weights) == (
        {"k_proj", "v_proj", "fc2"}, {"fc2"}, False)
    unknown = transformers.T5ForConditionalGeneration(tiny_t5_like(_UnknownConfig))
    with pytest.raises(RecipeError, match=r"^ia3.target_modules: .* model type 'my-seq2seq'"):
        IA3Seq2SeqTrainer.build_ia3_config(recipe, unknown)


def test_cli_lists_every_family(capsys):
    from ia3_trainer.cli.main import main

    assert main(["list-architectures"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(IA3_TARGETS)
    assert rows["mt5"].split(None, 1)[1] == 'peft default  ["k", "v", "wi_1"] / []'  # JSON, to paste into a recipe
    assert rows["t5gemma"].split(None, 1)[1] == 'ia3-trainer   ["k_proj", "v_proj", "down_proj"] / ["down_proj"]'
