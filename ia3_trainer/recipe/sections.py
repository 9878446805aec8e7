"""The recipe's sections: what each may hold, and the checks of its values (each section checks its own).

`model`, `data`, `eval` and `hub` are dataclasses whose `__post_init__` checks their values and raises one line per
problem as `field: problem; fix`. `ia3` and `training` are the keyword arguments of `peft.IA3Config` and
[`IA3TrainingArguments`]: their keys and types come from those classes (`field_types`, which stores them), and
`check_training_values` adds the ranges that `TrainingArguments` accepts but training then crashes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ia3_trainer.errors import RecipeError
from ia3_trainer.recipe.schema import Problems, did_you_mean


# IA3Config fields the trainer sets itself: a recipe that set them would be overridden or break loading.
IA3_RESERVED = {
    "task_type", "peft_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"
}
# Pushing goes through the `hub` section (PushAdapterToHubCallback); Trainer's own push options would make a
# second, competing upload of the same folder, so a recipe may not set them.
TRAINING_RESERVED = {
    "push_to_hub": "hub.repo_id",
    "hub_model_id": "hub.repo_id",
    "hub_strategy": "hub.strategy",
    "hub_token": "the HF_TOKEN environment variable (a token never goes in a recipe)",
    "hub_private_repo": "hub.private",
}
# `training` keys that hold paths when they are strings: `./` and `../` in them are made absolute (as in the fields
# marked "path"); the last three may instead hold the settings as an object. (transformers 5 has no logging_dir.)
TRAINING_PATH_FIELDS = ("output_dir", "resume_from_checkpoint", "deepspeed", "fsdp_config", "accelerator_config")
# Token limits (data.max_*_length, training.generation_max_length): tokenizers overflow on larger ones.
MAX_TOKENS = 1_000_000
# Values TrainingArguments accepts and training then crashes on (or runs forever with): (check, rule[, fix]).
TRAINING_RANGES = {
    "learning_rate": (lambda v: v > 0, "> 0"),
    # 1e308 epochs overflow the step count; a run that long is set with max_steps
    "num_train_epochs": (lambda v: 0 < v <= 1_000_000, "in (0, 1,000,000]", "for longer runs set max_steps"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (train for num_train_epochs) or >= 1"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "eval_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "warmup_steps": (lambda v: v >= 0, ">= 0 (a number < 1 is a fraction of the steps)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, ">= 0"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "logging_steps": (lambda v: v > 0, "> 0 (a number < 1 is a fraction of the steps)"),
    "save_steps": (lambda v: v > 0, "> 0 (a number < 1 is a fraction of the steps)"),
    "eval_steps": (lambda v: v > 0, "> 0 (a number < 1 is a fraction of the steps)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1]"),
    "data_seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1]"),
    "dataloader_num_workers": (lambda v: 0 <= v <= 1024, "in [0, 1024]"),  # a million workers never start
    "generation_max_length": (lambda v: 1 <= v <= MAX_TOKENS, f"in [1, {MAX_TOKENS:,}]"),
    "generation_num_beams": (lambda v: v >= 1, ">= 1"),
}


@dataclass(frozen=True)
class Metric:
    """One metric a recipe's `eval.metrics` may list.

    description (`str`): what it reports. reads (`str`): what evaluation computes for it: `"loss"` (the token loss),
    `"ranking"` (the most likely candidate label), `"generation"` (generated text, compared in
    `metrics.eval_metrics`), or `"text"` (generated text, scored by the function
    `ia3_trainer.evaluation.metrics.<name>`, `(predictions, references) -> {key: value}`). All that read generated text
    share the eval loop's one generation. package (`(module, pip name)`, *optional*): the optional package it needs.
    default (`bool`): listed when a recipe leaves `eval.metrics` out.
    """

    description: str
    reads: Literal["loss", "ranking", "generation", "text"] = "text"
    package: tuple[str, str] | None = None
    default: bool = False


# What a recipe's `eval.metrics` may list: the one registry (validation, defaults, evaluation and the docs read it).
METRICS = {
    "perplexity": Metric("exp of the mean token loss over the whole eval set", reads="loss", default=True),
    "label_accuracy": Metric("share of generated texts equal to the reference", reads="generation", default=True),
    "rank_accuracy": Metric("share of examples whose most likely candidate label is the reference (needs a label "
                            "set)", reads="ranking", default=True),
    "rouge": Metric("mean rouge1, rouge2, rougeL, rougeLsum F1 in [0, 1], as evaluate's rouge (pip install "
                    "rouge-score)", package=("rouge_score", "rouge-score")),
    "sacrebleu": Metric("corpus BLEU in [0, 100] (pip install sacrebleu)", package=("sacrebleu", "sacrebleu")),
    "chrf": Metric("corpus chrF in [0, 100] (pip install sacrebleu)", package=("sacrebleu", "sacrebleu")),
}
DEFAULT_METRICS = tuple(name for name, metric in METRICS.items() if metric.default)
# load_dataset keywords that carry credentials: a recipe is saved as recipe.json and pushed with the adapter.
_SECRET_LOAD_KWARGS = ("token", "use_auth_token", "storage_options", "download_config")


@dataclass
class ModelSection:
    """Which base model and tokenizer to load.

    > Parameters that control loading

    name_or_path (`str`):
        Hub model id (`bigscience/mt0-large`) or local folder. Paths starting with `./` or `../` are relative to
        the recipe file.
    revision (`str`, *optional*):
        Hub branch, tag or commit; pin one for reproducible runs.
    dtype (`str`, *optional*, defaults to `"auto"`):
        Weights dtype: `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
    tokenizer_name_or_path (`str`, *optional*):
        Tokenizer to load when it is not stored with the model.
    init (`str`, *optional*, defaults to `"pretrained"`):
        `pretrained` loads the weights; `random` builds the model from its config with random weights (the
        offline tiny recipe and smoke tests).
    trust_remote_code (`bool`, *optional*, defaults to `False`):
        Run code shipped with a Hub model. Off unless the recipe turns it on.
    """

    name_or_path: str = field(
        metadata={"help": "Hub model id or local folder (./ and ../ are recipe-relative).", "path": True}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit to load."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weights dtype: auto (the checkpoint's), float32, bfloat16 or float16."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to load when it is not stored with the model.", "path": True}
    )
    init: Literal["pretrained", "random"] = field(
        default="pretrained",
        metadata={"help": "pretrained loads the weights; random builds the model from its config (tests, tiny)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with a Hub model."})


@dataclass
class DataSection:
    """Where the examples come from and how they become model inputs.

    > Parameters passed to `datasets.load_dataset`

    path (`str`):
        Hub dataset id, or a builder name (`csv`, `json`, `parquet`, `text`) used with `data_files`.
    name (`str`, *optional*):
        Dataset configuration name.
    data_files (`str`, `list` or `dict`, *optional*):
        Files per split; local paths, URLs, `hf://` paths and chained `zip://member::archive` paths all work.
    load_kwargs (`dict`, *optional*, defaults to `{}`):
        Any other `load_dataset` keyword (e.g. `{"encoding": "latin-1"}`).

    > Parameters that control splits

    train_split (`str`, *optional*, defaults to `"train"`):
        Split to train on.
    validation_split (`str`, *optional*):
        Split to evaluate on. When unset, `validation_size` of `train_split` is held out.
    validation_size (`float` or `int`, *optional*, defaults to `0.1`):
        Fraction (< 1) or number of training examples held out for evaluation; 0 disables evaluation.
    split_seed (`int`, *optional*, defaults to `42`):
        Seed of the held-out split.
    max_train_samples / max_eval_samples (`int`, *optional*):
        Keep only the first N examples of a split (quick runs and benchmarks).

    > Parameters that control examples

    text_column / label_column (`str`):
        Source text and target label columns; a dotted name (`translation.en`) picks a nested field.
    label_separator (`str`, *optional*):
        For one-column text files such as `sentence@label`: split each line on the last occurrence.
    label_names (`list[str]`, *optional*):
        Text of each integer label, when the dataset does not carry ClassLabel names. With text labels, the
        allowed label set.
    source_prefix (`str`, *optional*, defaults to `""`):
        Text put before every source (e.g. `"classify: "`).
    max_source_length / max_target_length (`int`):
        Token limits; sources are truncated. A classification label that does not fit is an error; free-text
        targets (no label set: summaries, translations) are truncated, with a logged count.
    """

    path: str = field(metadata={"help": "Hub dataset id, or a builder name (csv, json, parquet, text).", "path": True})
    name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: str | list[str] | dict[str, str | list[str]] | None = field(
        default=None, metadata={"help": "Files per split (local, URL, hf://, zip://member::archive).", "path": True}
    )
    load_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Other load_dataset keywords."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(default=None, metadata={"help": "Split to evaluate on."})
    validation_size: float | int = field(
        default=0.1,
        metadata={"help": "Fraction (< 1) or count of train_split held out when validation_split is unset."},
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the held-out split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N eval examples."})
    text_column: str = field(default="sentence", metadata={"help": "Source text column (a.b for a nested field)."})
    label_column: str = field(default="label", metadata={"help": "Target label column (a.b for a nested field)."})
    label_separator: str | None = field(
        default=None, metadata={"help": "Split one-column lines such as sentence@label on the last separator."}
    )
    label_names: list[str] | None = field(
        default=None, metadata={"help": "Text of each integer label, or the allowed text labels."}
    )
    source_prefix: str = field(default="", metadata={"help": "Text put before every source."})
    max_source_length: int = field(default=128, metadata={"help": "Source token limit (longer is truncated)."})
    max_target_length: int = field(
        default=3, metadata={"help": "Target token limit (a longer class label is an error; free text is truncated)."}
    )

    def __post_init__(self):
        problems = []
        for key in _SECRET_LOAD_KWARGS:
            if key in self.load_kwargs:
                problems.append(f"load_kwargs.{key}: not allowed: a recipe is saved as recipe.json and pushed with "
                                "the adapter, so it never holds credentials; set HF_TOKEN or run `hf auth login`")
        size = self.validation_size
        if isinstance(size, float) and not 0 <= size < 1:
            problems.append(f"validation_size: a fraction must be in [0, 1), got {size}; or give a count")
        if isinstance(size, int) and size < 0:
            problems.append(f"validation_size: must be >= 0, got {size}")
        for key in ("max_source_length", "max_target_length"):
            value = getattr(self, key)
            if isinstance(value, int) and not 1 <= value <= MAX_TOKENS:
                problems.append(f"{key}: must be in [1, {MAX_TOKENS:,}], got {value}")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:
                problems.append(f"{key}: must be >= 1, got {value}")
        if isinstance(self.split_seed, int) and not 0 <= self.split_seed < 2**32:
            problems.append(f"split_seed: must be in [0, 2**32 - 1], got {self.split_seed}")
        if self.label_names is not None:
            if not self.label_names:
                problems.append("label_names: is empty; list the label texts, or remove the key")
            elif len(set(self.label_names)) != len(self.label_names):
                problems.append(f"label_names: has duplicates: {self.label_names}")
            elif any(not name.strip() for name in self.label_names):
                problems.append("label_names: has an empty label text")
        if self.label_separator == "":
            problems.append("label_separator: is empty; give the separator, e.g. \"@\", or remove the key")
        if self.text_column == self.label_column:
            problems.append(f"label_column: is the same column as data.text_column ({self.text_column!r})")
        if problems:
            raise RecipeError(problems)


@dataclass
class EvalSection:
    """What evaluation reports: the trainer's `compute_metrics` (the `training` section says when it runs).

    metrics (`list[str]`, *optional*, defaults to `DEFAULT_METRICS`, the metrics of `METRICS` marked default):
        Names of `METRICS`: `perplexity`, `label_accuracy`, `rank_accuracy` (classification), `rouge` (needs
        `rouge-score`), `sacrebleu` and `chrf` (need `sacrebleu`). Metrics that compare generated text share one
        generation pass. Other `evaluate` metrics run scripts, so they come from code, not recipes: override
        `IA3Seq2SeqTrainer.build_compute_metrics` and use `ia3_trainer.evaluation.metrics.evaluate_metric`.
    """

    metrics: list[str] = field(
        default_factory=lambda: list(DEFAULT_METRICS),
        metadata={"help": f"Metric names ({', '.join(METRICS)})."},
    )

    def __post_init__(self):
        problems = []
        for name in self.metrics:
            if name.startswith("evaluate:"):
                # evaluate.load runs a metric script, and a recipe is data that must never make the package run code.
                problems.append(f"metrics: {name!r}: recipes cannot load evaluate scripts (that would run code); "
                                "override IA3Seq2SeqTrainer.build_compute_metrics and call "
                                "ia3_trainer.evaluation.metrics.evaluate_metric there")
            elif name not in METRICS:
                problems.append(f"metrics: unknown metric {name!r}{did_you_mean(name, METRICS)} "
                                f"(known: {', '.join(METRICS)})")
        if len(set(self.metrics)) != len(self.metrics):
            problems.append(f"metrics: has duplicates: {self.metrics}")
        if problems:
            raise RecipeError(problems)


@dataclass
class HubSection:
    """Push the adapter to the Hugging Face Hub. The token comes from `HF_TOKEN` or `hf auth login`, never here.

    repo_id (`str`, *optional*):
        `user/name` of the adapter repo; unset means no push.
    private (`bool`, *optional*, defaults to `True`):
        Create the repo private.
    strategy (`str`, *optional*, defaults to `"end"`):
        When to push: `end` of training, every `epoch`, or every `checkpoint`.
    """

    repo_id: str | None = field(default=None, metadata={"help": "user/name of the adapter repo; unset = no push."})
    private: bool = field(default=True, metadata={"help": "Create the repo private."})
    strategy: Literal["end", "epoch", "checkpoint"] = field(
        default="end", metadata={"help": "When to push: end, epoch or checkpoint."}
    )

    def __post_init__(self):
        problem = check_repo_id(self.repo_id) if isinstance(self.repo_id, str) else None
        if problem:
            raise ValueError(f"repo_id: {problem}")


def check_repo_id(repo_id: str) -> str | None:
    """What is wrong with `repo_id` as the Hub repo to push an adapter to (`user/name`), or None when nothing is.

    `HubSection` and [`PushAdapterToHubCallback`] both check with this function.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return f"{' '.join(str(error).split())}; use 'user/name', e.g. 'alice/flan-t5-small-ia3'"
    if repo_id.count("/") != 1:
        return f"{repo_id!r} has no namespace; use 'user/name', e.g. 'alice/{repo_id}'"
    return None


def check_training_values(training: dict, problems: Problems) -> None:
    """Refuse Trainer's own push options, and numbers out of the range training can run with (`TRAINING_RANGES`)."""
    for key, value in training.items():
        if key in TRAINING_RESERVED:
            problems.add(f"training.{key}", f"not allowed in a recipe; use {TRAINING_RESERVED[key]} instead")
        elif key.startswith("hub_"):  # every other option of Trainer's own push (hub_revision, ...)
            problems.add(f"training.{key}", "not allowed in a recipe: pushing goes through the hub section")
        elif type(value) is int and not -(2**63) <= value < 2**63:  # torch, numpy and itertools take 64-bit ints
            problems.add(f"training.{key}", f"must fit in 64 bits, got {value}")
        elif key in TRAINING_RANGES and type(value) in (int, float):
            check, rule, *fix = TRAINING_RANGES[key]
            if not (math.isfinite(value) and check(value)):
                problems.add(f"training.{key}", f"must be {rule}, got {value}" + "".join(f"; {f}" for f in fix))


def check_ia3_values(ia3: dict, problems: Problems) -> None:
    """Target and feed-forward module lists that peft would accept but that cannot mean what was meant."""
    targets, feedforward = ia3.get("target_modules"), ia3.get("feedforward_modules")
    if isinstance(targets, list) and not targets:
        problems.add("ia3.target_modules", "is empty; list module names, or null for peft's default")
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        problems.add("ia3.feedforward_modules", f"must be a subset of target_modules {sorted(targets)}")
    if feedforward and targets is None:
        problems.add("ia3.feedforward_modules", "is set but target_modules is null; set ia3.target_modules too")



@dataclass(frozen=True)
class Section:
    """One section of a recipe.

    checked_by (`type`, *optional*): the dataclass that holds and checks it; None for `ia3` and `training`, the
    keyword arguments of `peft.IA3Config` and [`IA3TrainingArguments`] (`field_types.ia3_field_types`,
    `training_field_types`). required (`bool`): a recipe must have it. resumable (`bool`): it may change when a run
    is resumed (nothing it holds changes what is trained).
    """

    checked_by: type | None = None
    required: bool = False
    resumable: bool = False


# The sections of a recipe, in the order `recipe.json` lists them (after `name` and `description`): the one registry
# that loading, overrides, resuming and the docs read. A new section is a dataclass, a line here and a `Recipe` field.
RECIPE_SECTIONS = {
    "model": Section(ModelSection, required=True),
    "data": Section(DataSection, required=True),
    "ia3": Section(),
    "training": Section(),
    "eval": Section(EvalSection, resumable=True),
    "hub": Section(HubSection, resumable=True),
}
