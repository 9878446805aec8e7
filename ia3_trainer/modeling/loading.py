"""Load the tokenizer and the base model, and the fixes every loaded model gets: the untied-head guard and the dtype of
the frozen weights. [`IA3Seq2SeqTrainer`] and [`IA3Predictor`] both load through here, so a model is the same object
whether it is trained or used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings

from ia3_trainer import network
from ia3_trainer.errors import RecipeError, first_line, one_line
from ia3_trainer.processes import is_main_process
from ia3_trainer.recipe.loading import ModelSection


logger = logging.getLogger(__name__)


# How a model's own code is allowed, said when it is needed and not allowed; an adapter's loader says its own.
RECIPE_TRUST = "the recipe sets model.trust_remote_code: true"


def load_tokenizer(model: ModelSection, key: str | None = None, trust: str = RECIPE_TRUST):
    """The tokenizer of the `model` section (`tokenizer_name_or_path`, else `name_or_path`). `key` names the recipe
    field a failure is blamed on; it defaults to the one that was read. `trust` says how the caller allows a model's
    own code, for the message when one ships code that was not allowed."""
    from transformers import AutoTokenizer

    name = model.tokenizer_name_or_path or model.name_or_path
    key = key or ("model.tokenizer_name_or_path" if model.tokenizer_name_or_path else "model.name_or_path")
    return _from_hub_or_cache(
        lambda **cache: AutoTokenizer.from_pretrained(
            name, revision=model.revision, trust_remote_code=model.trust_remote_code, **cache
        ), name, key, "a tokenizer", trust,
    )


def load_model(model: ModelSection, seed: int = 42, key: str = "model.name_or_path", trust: str = RECIPE_TRUST):
    """The base seq2seq model of the `model` section (built from its config with `init: random`), with the
    untied-head guard applied. Code shipped with a model runs only when `model.trust_remote_code` is true (`trust`
    says how the caller sets that, for the message)."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, set_seed

    dtype = model.dtype if model.dtype == "auto" else getattr(torch, model.dtype)
    common = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}

    def load(**cache):
        if model.init == "random":
            config = AutoConfig.from_pretrained(model.name_or_path, **common, **cache)
            set_seed(seed)
            return AutoModelForSeq2SeqLM.from_config(
                config, trust_remote_code=model.trust_remote_code, dtype=None if dtype == "auto" else dtype
            )
        if cache:  # transformers 5.24 does not pass local_files_only on to its adapter_config.json lookup
            cache = {**cache, "adapter_kwargs": {"local_files_only": True}}
        return AutoModelForSeq2SeqLM.from_pretrained(model.name_or_path, dtype=dtype, **common, **cache)

    base = _from_hub_or_cache(load, model.name_or_path, key, "a seq2seq model", trust)
    untie_separate_lm_head(base)
    return base


def _from_hub_or_cache(load, name: str, key: str, what: str, trust: str = RECIPE_TRUST):
    """`load()` through [`network.load_or_cached`]; every failure is one [`RecipeError`] naming `key`."""
    try:
        return network.load_or_cached(load, name)
    except network.NotCached as error:
        raise RecipeError(
            f"{key}: cannot load {what} from {name!r}: {error}, and it is not in the local cache; connect to the "
            f"network or point {key} at a local folder ({network.OFFLINE_HINT})"
        ) from None  # the cause is in the message; the chain (retries, cache misses) is a page of noise
    except (OSError, ValueError) as error:
        if "custom code" in str(error) or "trust_remote_code" in str(error):
            shipped = remote_code(name)
            raise RecipeError(
                f"{key}: {name!r} ships its own Python code{f' ({shipped})' if shipped else ''}, which runs only "
                f"when {trust} (read that code first); or use a model that transformers knows"
            ) from error
        raise RecipeError(
            f"{key}: cannot load {what} from {name!r}{network.offline_note()}: {first_line(error)}; check the id "
            "and the network, or point it at a local folder"
        ) from error
    except Exception as error:
        # Damaged or foreign files fail inside the libraries with their own errors, which name no file: a cut
        # model.safetensors (SafetensorError), a tokenizer.json without its fields (KeyError), a config.json value of
        # the wrong type (huggingface_hub's StrictDataclassFieldValidationError).
        raise RecipeError(
            f"{key}: cannot load {what} from {name!r}: its files are damaged or of another kind "
            f"({one_line(error, 200)}); download or save it again, or point it at another model"
        ) from error


def remote_code(name: str) -> str:
    """The classes a local model folder's `auto_map` names (`config.json`, `tokenizer_config.json`): the code that
    `trust_remote_code` would run, as `module.Class` names. Empty for a Hub id, whose files are not read here."""
    import json
    from pathlib import Path

    entries: list[str] = []
    for file in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(name).expanduser() / file).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        for value in (auto_map.values() if isinstance(auto_map, dict) else ()):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item.split("--")[-1] not in entries:
                    entries.append(item.split("--")[-1])
    return ", ".join(entries)


def untie_separate_lm_head(model) -> bool:
    """Mark the config untied when the output embedding is its own tensor (mt0, mT5, flan-t5).

    transformers 5 loads these heads correctly but leaves `tie_word_embeddings: true`, so a later
    `tie_weights()` or `resize_token_embeddings()` (FSDP and ZeRO-3 set-up call them) would silently replace
    the head by the input embeddings. Passing `tie_word_embeddings=False` to `from_pretrained` instead would
    drop the shared encoder/decoder embeddings of safetensors checkpoints, so the flag is fixed after loading.
    """
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None or not getattr(model.config, "tie_word_embeddings", False):
        return False
    if output.weight is inputs.weight:
        return False
    model.config.tie_word_embeddings = False
    return True


def cast_frozen_weights(model, dtype) -> None:
    """Store the frozen base weights in `dtype`; the trainable IA3 vectors stay fp32.

    With bf16 on, autocast alone would recompute a bf16 copy of every frozen weight at each step and keep it for
    the backward pass: faster than fp32, but more memory. Frozen weights never receive updates, so storing them in
    bf16 loses nothing to rounding over time, halves their memory and skips the casts (benchmarks/throughput.py).
    The IA3 layers (`ia3_trainer.modeling.layers`) scale in the activations' dtype.
    """
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def wrap_with_ia3(model, peft_config=None):
    """Return `model` wrapped with IA3 (`peft.get_peft_model`), or the given IA3 `PeftModel` as it is.

    Without `peft_config` (or with one whose `target_modules` is None) the modules come from the model's family
    (`ia3_trainer.modeling.architectures`); a target that adapts some layers and misses others is warned about. The
    untied-head guard is applied either way.
    """
    from peft import IA3Config, PeftModel, PeftType, get_peft_model
    from transformers import PreTrainedModel

    from ia3_trainer.modeling.architectures import build_ia3_config, describe, warn_partial_matches

    if peft_config is not None and not isinstance(peft_config, IA3Config):
        raise TypeError(f"peft_config must be a peft.IA3Config, got {type(peft_config).__name__}")
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError(
                "You passed a PeftModel together with peft_config; pass the base model with peft_config, or "
                "the PeftModel alone"
            )
        if model.peft_config[model.active_adapter].peft_type != PeftType.IA3:
            kind = model.peft_config[model.active_adapter].peft_type.value
            raise ValueError(f"IA3Seq2SeqTrainer trains IA3 adapters, but the PeftModel has a {kind} adapter")
        untie_separate_lm_head(model.get_base_model())
        return model
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model must be a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}; "
            "to load by name use IA3Seq2SeqTrainer.from_recipe"
        )
    untie_separate_lm_head(model)
    if peft_config is None:
        peft_config = build_ia3_config(model)
    elif peft_config.target_modules is None:  # peft's own defaults know three families; the table knows all
        filled = build_ia3_config(model, {"feedforward_modules": peft_config.feedforward_modules})
        peft_config = dataclasses.replace(
            peft_config, target_modules=filled.target_modules, feedforward_modules=filled.feedforward_modules
        )
    if peft_config.task_type is None:
        peft_config.task_type = "SEQ_2_SEQ_LM"  # without it get_peft_model returns a PeftModel with no generate
    with peft_wrapping():
        wrapped = get_peft_model(model, peft_config)
    warn_partial_matches(wrapped)
    if is_main_process():  # launchers start the same command in every process; print once per run
        print(f"{describe(peft_config)} ({model.config.model_type})")
    return wrapped


# IA3 never adapts embedding layers. peft's default (`save_embedding_layers="auto"`) asks the Hub at every save whether
# the base model's vocabulary was resized: a request per checkpoint, and about 24 s of retries per save when the Hub
# cannot be reached. Our own saves pass this; a user's own `save_pretrained` call keeps peft's default.
SAVE_OPTIONS = {"save_embedding_layers": False}


@contextlib.contextmanager
def saving_adapter_only(peft_model):
    """For the block, `peft_model.save_pretrained` (as Trainer's `_save` calls it) saves with `SAVE_OPTIONS`; the
    model is as it was after the block. Only this instance is changed, never peft's class."""
    if not hasattr(peft_model, "peft_config") or "save_pretrained" in vars(peft_model):
        yield  # not a peft model, or one whose save_pretrained someone set already: left as it is
        return
    peft_model.save_pretrained = functools.partial(type(peft_model).save_pretrained, peft_model, **SAVE_OPTIONS)
    try:
        yield
    finally:
        del peft_model.save_pretrained


@contextlib.contextmanager
def peft_wrapping():
    """Around a `peft.PeftModel` construction (`get_peft_model`, `PeftModel.from_pretrained`): peft reads
    transformers' deprecated `is_gradient_checkpointing`, a FutureWarning about their code that no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
