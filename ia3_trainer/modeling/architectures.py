"""IA3 target modules per model type: which projections IA3 scales in each text encoder-decoder family.

peft 0.21 ships IA3 defaults for `t5`, `mt5` and `bart` only; every other seq2seq family of transformers 5.24 made
the user find the module names. The table below covers them all. Each entry follows the IA3 paper on T5: scale the
keys and values of self- and cross-attention (the output of those projections) and the input of the feed-forward
output projection (a *feed-forward* module, scaled on its input). The names were read from each family's
`modeling_*.py` and checked on a tiny model (`tests/test_architectures.py` counts the vectors per layer).

A list entry matches a module whose name ends with `.<entry>` (peft's rule), so each entry names a suffix that only
the intended projections have; a string is a regex that must match the whole module name (peft's `re.fullmatch`).
"""

from __future__ import annotations

import logging
import re
import warnings

from ia3_trainer.errors import RecipeError


logger = logging.getLogger(__name__)

_T5 = (["k", "v", "wo"], ["wo"])
_BART = (["k_proj", "v_proj", "fc2"], ["fc2"])

# {model_type: (target_modules, feedforward_modules)}
IA3_TARGETS: dict[str, tuple[list[str] | str, list[str]]] = {
    # peft's own defaults (peft/utils/constants.py), kept exactly. mt5 scales the output of wi_1, the linear half of
    # the gated unit, which is the same as scaling the input of wo; bart scales queries rather than keys.
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    # T5 layout: {SelfAttention, EncDecAttention}.{k, v}; DenseReluDense.wo (gated or not). LongT5's encoder
    # attention is LocalSelfAttention or TransientGlobalSelfAttention, with the same k and v.
    "umt5": _T5,
    "longt5": _T5,
    # Switch: a dense layer's mlp.wo and each expert's mlp.experts.expert_<i>.wo; the router is left alone.
    "switch_transformers": _T5,
    # BART layout: {self_attn, encoder_attn}.{k_proj, v_proj}; fc2.
    "mbart": _BART,
    "plbart": _BART,
    "mvp": _BART,
    "marian": _BART,
    "fsmt": _BART,
    "m2m_100": _BART,
    "pegasus": _BART,
    "pegasus_x": _BART,
    "blenderbot": _BART,
    "blenderbot-small": _BART,
    # BigBird encoder attention is self_attn.self.{query, key, value}; the decoder has BART's k_proj and v_proj.
    "bigbird_pegasus": (["self.key", "self.value", "k_proj", "v_proj", "fc2"], ["fc2"]),
    # Longformer encoder attention: local key/value and the global key_global/value_global (used for the tokens
    # given global attention); the decoder is BART's.
    "led": ([
        "longformer_self_attn.key", "longformer_self_attn.value", "longformer_self_attn.key_global",
        "longformer_self_attn.value_global", "k_proj", "v_proj", "fc2",
    ], ["fc2"]),
    # ProphetNet: self_attn (the decoder's n-gram attention) and cross_attn have key_proj and value_proj; the
    # feed-forward block is feed_forward.{intermediate, output}.
    "prophetnet": (["key_proj", "value_proj", "feed_forward.output"], ["feed_forward.output"]),
    # Gemma layout: {self_attn, cross_attn}.{k_proj, v_proj} (grouped-query: num_key_value_heads x head_dim wide);
    # mlp.down_proj.
    "t5gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    # T5Gemma 2 is also multimodal: its SigLIP vision tower has self_attn.k_proj too, so the targets are a regex
    # over the text encoder and the decoder only. The decoder's merged attention uses one k_proj and one v_proj for
    # its own tokens and the encoder's.
    "t5gemma2": (
        r"(.*\.)?(encoder\.text_model|decoder)\.layers\.\d+\.(self_attn\.(k_proj|v_proj)|mlp\.down_proj)",
        ["down_proj"],
    ),
}
# Families whose entry is peft's own default; the others are this package's.
PEFT_DEFAULTS = ("t5", "mt5", "bart")


def origin(model_type: str) -> str:
    """`"peft default"` or `"ia3-trainer"`: who chose the table's entry for `model_type`."""
    return "peft default" if model_type in PEFT_DEFAULTS else "ia3-trainer"


def _model_type(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return model_type


def ia3_targets(model_or_config) -> tuple[list[str] | str, list[str]]:
    """The IA3 `(target_modules, feedforward_modules)` of a model's family (copies: change them freely).

    Args:
        model_or_config ([`~transformers.PreTrainedModel`] or [`~transformers.PretrainedConfig`]):
            The base model, or its config.

    Raises:
        `ValueError`: the family has no entry; the message names its `model_type`.

    Example:

    ```python
    >>> from transformers import T5Config
    >>> ia3_targets(T5Config())
    (['k', 'v', 'wo'], ['wo'])
    ```
    """
    model_type = _model_type(model_or_config)
    if model_type not in IA3_TARGETS:
        raise RecipeError(
            f"ia3.target_modules: ia3-trainer has no IA3 default for model type {model_type!r}; set "
            "ia3.target_modules and ia3.feedforward_modules to the model's key, value and feed-forward output "
            "projections (e.g. [\"k_proj\", \"v_proj\", \"fc2\"] and [\"fc2\"]); `ia3-trainer list-architectures` "
            "shows the known families"
        )
    targets, feedforward = IA3_TARGETS[model_type]
    return (targets if isinstance(targets, str) else list(targets)), list(feedforward)


def build_ia3_config(model, ia3: dict | None = None):
    """A `peft.IA3Config` for `model` from the `ia3` settings (a recipe's `ia3` section: IA3Config keywords).

    `target_modules` and `feedforward_modules` left null are filled in: both null take the family's entry of the
    table ([`ia3_targets`]); `target_modules` set and `feedforward_modules` null takes those of the given targets
    that the table marks feed-forward (all the table's feed-forward names when the targets are a regex, as peft
    does). `feedforward_modules` set with `target_modules` null is an error, as in recipe validation. The choice is
    logged (`logging.INFO`).

    Example:

    ```python
    >>> config = build_ia3_config(model, {"target_modules": None, "feedforward_modules": None})
    >>> sorted(config.target_modules), sorted(config.feedforward_modules)
    (['k', 'v', 'wo'], ['wo'])
    ```
    """
    from peft import IA3Config

    fields = dict(ia3 or {})
    targets, feedforward = fields.get("target_modules"), fields.get("feedforward_modules")
    model_type = _model_type(model)
    if targets is None and feedforward is not None:
        raise RecipeError("ia3.feedforward_modules: is set but target_modules is null; set ia3.target_modules too")
    if targets is None:
        targets, feedforward = ia3_targets(model)
        chosen = f"{origin(model_type)} for {model_type}"
    elif feedforward is None:
        feedforward = _feedforward_of(model, targets)
        chosen = f"recipe targets, feed-forward from the {origin(model_type)} entry for {model_type}"
    else:
        chosen = "recipe"
    fields.update(target_modules=targets, feedforward_modules=feedforward)
    fields.setdefault("task_type", "SEQ_2_SEQ_LM")
    config = IA3Config(**fields)
    logger.info("IA3 (%s): target_modules=%s feedforward_modules=%s", chosen, targets, feedforward)
    return config


def _feedforward_of(model, targets: list[str] | str) -> list[str]:
    """The given targets that the table marks feed-forward (peft matches feed-forward names as suffixes)."""
    try:
        _, feedforward = ia3_targets(model)
    except ValueError as error:
        raise RecipeError(
            f"ia3.feedforward_modules: is null and model type {_model_type(model)!r} has no IA3 default to take it "
            "from; set it to those of ia3.target_modules that are feed-forward output projections ([] for none)"
        ) from error
    if isinstance(targets, str):
        return feedforward
    return [t for t in targets if any(t == f or t.endswith(f".{f}") for f in feedforward)]


def describe(config) -> str:
    """One line saying which modules `config` (an `IA3Config`) scales, for printing."""
    def shown(value):
        return value if isinstance(value, str) or value is None else sorted(value)

    return f"IA3 target_modules={shown(config.target_modules)} feedforward_modules={shown(config.feedforward_modules)}"


# --- the partial-match check ------------------------------------------------------------------------------------


def warn_partial_matches(peft_model) -> list[str]:
    """Warn when a target pattern adapted a module in some repeated layers but matched nothing in others.

    A layer (a child of an `nn.ModuleList` of a stack that holds IA3 vectors) counts as missed by a pattern when
    the pattern matched nothing in it although it has a module at the same path as one the pattern matched in
    another layer (the same projection, left out), or it has the same sub-block (e.g. `self_attn`) with no IA3
    vector anywhere in it (e.g. BigBird's encoder names its key `self.key`, so `k_proj` adapts only the decoder).
    A projection that exists in the decoder only (cross-attention) is not a miss; `exclude_modules`, which leaves
    modules out on purpose, turns the check off. Returns the warning messages.
    """
    from peft.tuners.ia3 import IA3Layer

    config = peft_model.peft_config[peft_model.active_adapter]
    if config.exclude_modules:
        return []
    base = peft_model.get_base_model()
    modules = dict(base.named_modules())
    adapted = sorted(name for name, module in modules.items() if isinstance(module, IA3Layer))
    stacks = _repeated_layers(base)
    # Stacks with no IA3 vector at all (e.g. T5Gemma 2's vision tower) were left out on purpose.
    layers = [layer for layer_list in stacks.values() if _holds_any(layer_list, adapted) for layer in layer_list]
    targets = config.target_modules
    patterns = [(targets, True)] if isinstance(targets, str) else [(target, False) for target in sorted(targets)]
    messages = []
    for pattern, is_regex in patterns:
        matched = [name for name in adapted if _matches(pattern, name, is_regex)]
        paths = sorted({name[len(layer) + 1:] for layer in layers for name in matched if name.startswith(f"{layer}.")})
        missed = {layer: _missed_path(layer, paths, modules, adapted) for layer in layers
                  if not _holds_any([layer], matched)}
        missed = {layer: path for layer, path in missed.items() if path is not None}
        if missed:
            messages.append(
                f"ia3: target module {pattern!r} matched nothing in {len(missed)} of {len(layers)} layers "
                f"({_format_layers(list(missed))}), although other layers have it at {next(iter(missed.values()))}: "
                "those layers get no "
                "IA3 vector there; check ia3.target_modules (`ia3-trainer list-architectures` shows the defaults)"
            )
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return messages


def _matches(pattern: str, name: str, is_regex: bool) -> bool:
    """peft's rule: a regex matches the whole name; a list entry matches the name or a `.`-separated suffix."""
    if is_regex:
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith(f".{pattern}")


def _holds_any(layers: list[str], names: list[str]) -> bool:
    return any(name.startswith(f"{layer}.") for layer in layers for name in names)


def _missed_path(layer: str, paths: list[str], modules: dict, adapted: list[str]) -> str | None:
    """The first of `paths` (where other layers have the pattern's vector) that `layer` lacks, or None."""
    for path in paths:
        if f"{layer}.{path}" in modules:
            return path  # the same module is there, not adapted
        block = f"{layer}.{path.rpartition('.')[0]}".rstrip(".")
        if block in modules and not any(name.startswith(f"{block}.") for name in adapted):
            return path  # the same sub-block is there, with no IA3 vector at all
    return None


def _repeated_layers(model) -> dict[str, list[str]]:
    """`{stack: [layer names]}`: the children of each outermost `nn.ModuleList`, the repeated layers of a stack."""
    import torch

    stacks: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(f"{s}.") for s in stacks):
            stacks[name] = [f"{name}.{index}" for index in range(len(module))]
    return stacks


def _format_layers(layers: list[str]) -> str:
    grouped: dict[str, list[str]] = {}
    for layer in layers:
        stack, _, index = layer.rpartition(".")
        grouped.setdefault(stack, []).append(index)
    return ", ".join(f"{stack}.{{{','.join(indexes)}}}" if len(indexes) > 1 else f"{stack}.{indexes[0]}"
                     for stack, indexes in grouped.items())
