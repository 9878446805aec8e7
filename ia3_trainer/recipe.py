"""Recipe schema: load a JSON recipe, apply overrides, and check every field before any model is loaded.

A recipe has one section per object it feeds: `model` (the base model and tokenizer), `data` (the
`datasets.load_dataset` call and how examples become model inputs), `ia3` (a `peft.IA3Config`), `training`
(an [`IA3TrainingArguments`]), `eval` (the trainer's `compute_metrics`) and `hub` (the
[`PushAdapterToHubCallback`]); a trainer subclass may declare more (`recipe_sections`). `Recipe.from_dict` collects
every problem and raises one [`RecipeError`] that lists them, each as `<file>: <dotted.key>: <problem>; <fix>`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


SECTIONS = ("name", "description", "model", "data", "ia3", "training", "eval", "hub")
# IA3Config fields the trainer sets itself: a recipe that set them would be overridden or break loading.
_IA3_RESERVED = {
    "task_type", "peft_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"
}
# Pushing goes through the `hub` section (PushAdapterToHubCallback); Trainer's own push options would make a
# second, competing upload of the same folder, so a recipe may not set them.
_TRAINING_RESERVED = {
    "push_to_hub": "hub.repo_id",
    "hub_model_id": "hub.repo_id",
    "hub_strategy": "hub.strategy",
    "hub_token": "the HF_TOKEN environment variable (a token never goes in a recipe)",
    "hub_private_repo": "hub.private",
}


class RecipeError(ValueError):
    """A recipe (or the data it points at) is not usable; `errors` holds one line per problem."""

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


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

    name_or_path: str = field(metadata={"help": "Hub model id or local folder (./ and ../ are recipe-relative)."})
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit to load."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weights dtype: auto (the checkpoint's), float32, bfloat16 or float16."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to load when it is not stored with the model."}
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

    path: str = field(metadata={"help": "Hub dataset id, or a builder name (csv, json, parquet, text)."})
    name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: str | list[str] | dict[str, str | list[str]] | None = field(
        default=None, metadata={"help": "Files per split (local, URL, hf://, zip://member::archive)."}
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


@dataclass
class EvalSection:
    """What evaluation reports: the trainer's `compute_metrics` (the `training` section says when it runs).

    metrics (`list[str]`, *optional*, defaults to `["perplexity", "label_accuracy", "rank_accuracy"]`):
        Metric names: `perplexity`, `label_accuracy`, `rank_accuracy` (classification), `rouge` (needs
        `rouge-score`), `sacrebleu` and `chrf` (need `sacrebleu`). Metrics that compare generated text share one
        generation pass. Other `evaluate` metrics run scripts, so they come from code, not recipes: override
        `IA3Seq2SeqTrainer.build_compute_metrics` and use `ia3_trainer.metrics.evaluate_metric`.
    """

    metrics: list[str] = field(
        default_factory=lambda: ["perplexity", "label_accuracy", "rank_accuracy"],
        metadata={"help": "Metric names (perplexity, label_accuracy, rank_accuracy, rouge, sacrebleu, chrf)."},
    )


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


@dataclass
class Recipe:
    """A validated recipe. Build it with [`load_recipe`] or `Recipe.from_dict`, never field by field.

    Example:

    ```python
    >>> from ia3_trainer import load_recipe
    >>> recipe = load_recipe("tiny", overrides={"training.num_train_epochs": 1})
    >>> recipe.training["num_train_epochs"]
    1
    ```
    """

    model: ModelSection
    data: DataSection
    name: str = "ia3-run"
    description: str | None = None
    ia3: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    eval: EvalSection = field(default_factory=EvalSection)
    hub: HubSection = field(default_factory=HubSection)
    # Sections a trainer subclass declares in `recipe_sections`, by name: {"tfew": TFewSection(...)}.
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def from_dict(
        cls, raw: dict, source: str | Path | None = None, extra_sections: dict[str, type] | None = None
    ) -> Recipe:
        """Check `raw` against the schema and return a `Recipe`, or raise one `RecipeError` listing every problem.

        `extra_sections` maps more section names to dataclasses (a trainer subclass's `recipe_sections`); they are
        checked like the built-in ones and land in `recipe.extra`. Any other unknown section is still an error.
        """
        extra_sections = _check_extra_sections(extra_sections)
        sections = (*SECTIONS, *extra_sections)
        where = str(source) if source is not None else "<recipe>"
        base = Path(source).resolve().parent if source is not None else None
        errors: list[str] = []

        def err(key: str, problem: str) -> None:
            errors.append(f"{where}: {key}: {problem}")

        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: the recipe must be a JSON object, got {type(raw).__name__}")
        _check_json_data(raw, where)
        for key in raw:
            if key not in sections:
                err(key, f"unknown section{_did_you_mean(key, sections)}")

        name = raw.get("name", Path(source).stem if source is not None else "ia3-run")
        if not isinstance(name, str) or not name:
            err("name", "must be a non-empty string")
        description = raw.get("description")
        if description is not None and not isinstance(description, str):
            err("description", f"must be a string, got {_type_name(description)}")

        model = _build_section(ModelSection, raw, "model", err, required=True)
        data = _build_section(DataSection, raw, "data", err, required=True)
        hub = _build_section(HubSection, raw, "hub", err, required=False) or HubSection()
        evaluation = _build_section(EvalSection, raw, "eval", err, required=False) or EvalSection()
        _check_metric_names(evaluation.metrics, err)
        extra = {
            key: _build_section(section, raw, key, err, required=_has_required(section))
            for key, section in extra_sections.items()
        }
        ia3 = _check_passthrough(raw, "ia3", _ia3_field_types(), _IA3_RESERVED, err)
        # Trainer's push options are known fields, so they are type-checked here and refused just below.
        training = _check_passthrough(raw, "training", _training_field_types(), set(), err)
        for key in sorted(training or {}):
            if key in _TRAINING_RESERVED:
                err(f"training.{key}", f"not allowed in a recipe; use {_TRAINING_RESERVED[key]} instead")
            elif key.startswith("hub_"):  # every other option of Trainer's own push (hub_revision, ...)
                err(f"training.{key}", "not allowed in a recipe: pushing goes through the hub section")

        if model is not None and base is not None:
            model.name_or_path = _resolve(model.name_or_path, base)
            model.tokenizer_name_or_path = _resolve(model.tokenizer_name_or_path, base)
        if data is not None:
            if base is not None:
                data.path = _resolve(data.path, base)
                data.data_files = _resolve(data.data_files, base)
            _check_data_values(data, err)
        if ia3 is not None:
            _check_ia3_values(ia3, err)
        if errors:
            raise RecipeError(errors)

        training = dict(training or {})
        training.setdefault("output_dir", str(Path("outputs") / name))
        recipe = cls(
            model=model, data=data, name=name, description=description, ia3=dict(ia3 or {}), training=training,
            eval=evaluation, hub=hub, extra={key: value or extra_sections[key]() for key, value in extra.items()},
            source=None if source is None else str(source),
        )
        recipe.validate()
        return recipe

    def validate(self) -> None:
        """Build the objects the sections feed (without loading any model) and check what spans sections."""
        where = self.source or "<recipe>"
        errors: list[str] = []
        try:
            args = self.training_args()
        except (ValueError, TypeError) as error:
            errors.append(f"{where}: training: {_first_line(error)}")
            args = None
        except ImportError as error:  # e.g. training.deepspeed without the deepspeed package
            errors.append(f"{where}: training: {_first_line(error).strip()}; install it, or remove the setting that "
                          "needs it")
            args = None
        except OSError as error:  # accelerator_config, deepspeed and fsdp_config may name a JSON file to read
            keys = [key for key, value in self.training.items() if value == error.filename] or [""]
            errors.append(f"{where}: training{'.' if keys[0] else ''}{keys[0]}: cannot read {error.filename!r} "
                          f"({error.strerror}); give the path of a JSON file, or the settings as an object")
            args = None
        try:
            self.ia3_config()
        except (ValueError, TypeError) as error:
            errors.append(f"{where}: ia3: {_first_line(error)}")
        if self.hub.repo_id is not None:
            from .callbacks import PushAdapterToHubCallback

            try:  # the callback checks its own settings; its messages name the hub.* key
                PushAdapterToHubCallback(self.hub.repo_id, private=self.hub.private, strategy=self.hub.strategy)
            except (ValueError, TypeError) as error:
                errors.append(f"{where}: {_first_line(error)}")
        has_validation = self.data.validation_split is not None or self.data.validation_size > 0
        if args is not None and str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no":
            if not has_validation:
                errors.append(
                    f"{where}: training.eval_strategy: is {args.eval_strategy.value!r} but there is no validation "
                    "data; set data.validation_split or data.validation_size > 0, or eval_strategy 'no'"
                )
        if args is not None and args.load_best_model_at_end and not has_validation:
            errors.append(
                f"{where}: training.load_best_model_at_end: needs validation data; set data.validation_size > 0"
            )
        if errors:
            raise RecipeError(errors)

    def training_args(self):
        """The [`IA3TrainingArguments`] of the `training` section."""
        from .training_args import IA3TrainingArguments

        return IA3TrainingArguments(**self.training)

    def ia3_config(self):
        """The `peft.IA3Config` of the `ia3` section (unset fields take peft's per-architecture defaults)."""
        from peft import IA3Config

        return IA3Config(task_type="SEQ_2_SEQ_LM", **self.ia3)

    def to_dict(self) -> dict:
        """The resolved recipe as plain JSON data (what `recipe.json` holds)."""
        return {
            "name": self.name,
            "description": self.description,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "ia3": copy.deepcopy(self.ia3),
            "training": copy.deepcopy(self.training),
            "eval": dataclasses.asdict(self.eval),
            "hub": dataclasses.asdict(self.hub),
            **{key: dataclasses.asdict(value) for key, value in self.extra.items()},
        }

    def save(self, folder: str | Path) -> Path:
        """Write the resolved recipe as `recipe.json` in `folder` (no token can be in it: recipes hold none)."""
        path = Path(folder) / "recipe.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def shipped_recipes_dir() -> Path:
    """Where the shipped recipes are: `recipes/` beside the package in a source checkout (a git worktree too),
    `ia3_trainer/recipes` once installed."""
    package = Path(__file__).resolve().parent
    if (package.parent / "pyproject.toml").is_file() and (package.parent / "recipes").is_dir():
        return package.parent / "recipes"
    installed = package / "recipes"
    if installed.is_dir():
        return installed
    try:  # editable installs map ia3_trainer.recipes onto the checkout's recipes/ through an import hook
        from importlib.resources import files

        return Path(str(files("ia3_trainer.recipes")))
    except (ModuleNotFoundError, TypeError):
        return package.parent / "recipes"


def list_shipped_recipes() -> dict[str, Path]:
    """Shipped recipes by name (path relative to the recipes folder, without `.json`)."""
    root = shipped_recipes_dir()
    return {
        path.relative_to(root).with_suffix("").as_posix(): path
        for path in sorted(root.rglob("*.json"))
        if "assets" not in path.relative_to(root).parts
    }


def load_recipe(
    name_or_path: str | Path | dict,
    overrides: dict[str, Any] | list[str] | None = None,
    extra_sections: dict[str, type] | None = None,
) -> Recipe:
    """Load a recipe by shipped name (`"phrasebank"`), file path, or dict; apply `overrides`; validate it.

    `overrides` is a `{"training.learning_rate": 1e-2}` mapping or a list of `"key=value"` strings as given on the
    command line (each value parsed as JSON, else kept as a string). `extra_sections` declares more sections (see
    `Recipe.from_dict`); a trainer subclass passes its `recipe_sections`.
    """
    if isinstance(name_or_path, dict):
        raw, source = copy.deepcopy(name_or_path), None
    else:
        path = Path(name_or_path)
        shipped = list_shipped_recipes()
        if not path.is_file() and str(name_or_path) in shipped:
            path = shipped[str(name_or_path)]
        if not path.is_file():
            names = ", ".join(shipped) or "none"
            raise RecipeError(f"{name_or_path}: no such recipe file or shipped recipe (shipped: {names})")
        source = path
        raw = _read_json(path)
    if overrides:
        raw = apply_overrides(raw, overrides, source=source, extra_sections=extra_sections)
    return Recipe.from_dict(raw, source=source, extra_sections=extra_sections)


def apply_overrides(
    raw: dict,
    overrides: dict[str, Any] | list[str],
    source: str | Path | None = None,
    extra_sections: dict[str, type] | None = None,
) -> dict:
    """Return a copy of `raw` with dotted-key overrides applied; a key the schema does not have is an error."""
    where = str(source) if source is not None else "<recipe>"
    extra_sections = _check_extra_sections(extra_sections)
    sections = (*SECTIONS, *extra_sections)
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise RecipeError(f"{where}: --set {item!r}: expected key=value, e.g. training.learning_rate=1e-2")
            pairs.append((key.strip(), _parse_value(text)))
    result = copy.deepcopy(raw)
    errors = []
    for key, value in pairs:
        # A relative path typed on the command line (or passed in Python) means the current folder, not the recipe's.
        value = _resolve(value, Path.cwd())
        parts = key.split(".")
        known = _known_keys(parts[0], extra_sections)
        if parts[0] not in sections:
            errors.append(f"{where}: {key}: unknown section{_did_you_mean(parts[0], sections)}")
            continue
        if known is None:  # name / description
            if len(parts) != 1:
                errors.append(f"{where}: {key}: {parts[0]} is a plain value, set it as {parts[0]}=...")
                continue
            result[parts[0]] = value
            continue
        if len(parts) < 2:
            errors.append(f"{where}: {key}: name a field, e.g. {parts[0]}.{sorted(known)[0]}=...")
            continue
        if parts[1] not in known:
            errors.append(f"{where}: {key}: unknown key{_did_you_mean(parts[1], known, prefix=parts[0] + '.')}")
            continue
        node = result.setdefault(parts[0], {})
        if not isinstance(node, dict):
            errors.append(f"{where}: {parts[0]}: must be a JSON object to override {key}")
            continue
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(f"{where}: {key}: {part} is not an object, it cannot hold {parts[-1]}")
                break
        else:
            node[parts[-1]] = value
    if errors:
        raise RecipeError(errors)
    return result


# --- helpers -----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start}); save the recipe as UTF-8") from error
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    except RecursionError as error:  # json.loads recurses once per level; a hostile file can nest 100,000 deep
        raise RecipeError(f"{path}: nested too deeply to read; recipes nest lists and objects a few levels") from error
    _check_json_data(raw, str(path))
    return raw


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


_MAX_NESTING = 32  # real recipes nest 4 levels (data.data_files); deeper data would exhaust the stack downstream


def _check_json_data(raw: Any, where: str) -> None:
    """Reject what JSON can hold but a recipe cannot, per section: nesting deeper than `_MAX_NESTING` (deepcopy,
    type checks and json.dumps recurse) and lone surrogates such as `"\\ud800"` (not text: printing or saving fails).
    """
    if not isinstance(raw, dict):
        return
    problems = []
    for key, value in raw.items():
        depth, level, strings = 0, [value], [key]  # breadth-first, so the check never recurses itself
        while level and depth <= _MAX_NESTING:
            strings += [item for node in level for item in (node if isinstance(node, dict) else [node])
                        if isinstance(item, str)]
            level = [child for node in level if isinstance(node, (dict, list))
                     for child in (node.values() if isinstance(node, dict) else node)]
            depth += 1
        if depth > _MAX_NESTING:
            problems.append(f"{where}: {key}: nests lists and objects over {_MAX_NESTING} levels deep; flatten it")
        elif any(not _is_text(item) for item in strings):
            problems.append(f"{where}: {key}: holds a lone surrogate (an escape such as \\ud800), which is not text; "
                            "remove it")
    if problems:
        raise RecipeError(problems)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _known_keys(section: str, extra_sections: dict[str, type] | None = None) -> set[str] | None:
    classes = {"model": ModelSection, "data": DataSection, "eval": EvalSection, "hub": HubSection,
               **(extra_sections or {})}
    if section in classes:
        return {f.name for f in dataclasses.fields(classes[section])}
    if section == "ia3":
        return set(_ia3_field_types()) - _IA3_RESERVED
    if section == "training":
        return set(_training_field_types())
    return None


def _did_you_mean(key: str, options, prefix: str = "") -> str:
    match = difflib.get_close_matches(key, sorted(options), n=1)
    return f"; did you mean {prefix + match[0]!r}?" if match else ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _resolve(value: Any, base: Path) -> Any:
    """Make `./x` and `../x` relative to the recipe file; leave Hub ids, builder names and URLs alone."""
    if isinstance(value, str):
        if value.startswith(("./", "../")):
            return str((base / value).resolve())
        if "::./" in value or "::../" in value:  # zip://member::./archive.zip
            head, _, tail = value.rpartition("::")
            return f"{head}::{(base / tail).resolve()}"
        return value
    if isinstance(value, list):
        return [_resolve(item, base) for item in value]
    if isinstance(value, dict):
        return {key: _resolve(item, base) for key, item in value.items()}
    return value


def _build_section(cls, raw: dict, section: str, err, required: bool):
    value = raw.get(section)
    if value is None:
        if required:
            fields = [f.name for f in dataclasses.fields(cls) if _is_required(f)]
            err(section, f"missing section; add \"{section}\": {{{', '.join(repr(f) + ': ...' for f in fields)}}}")
        return None
    if not isinstance(value, dict):
        err(section, f"must be a JSON object, got {_type_name(value)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    ok = True
    for key in value:
        if key not in fields:
            err(f"{section}.{key}", f"unknown key{_did_you_mean(key, fields, prefix=section + '.')}")
            ok = False
    for name, f in fields.items():
        if name not in value:
            if _is_required(f):
                err(f"{section}.{name}", f"missing required field; {f.metadata['help']}")
                ok = False
            continue
        problem = _check_type(value[name], hints[name])
        if problem:
            err(f"{section}.{name}", problem)
            ok = False
    if not ok:
        return None
    try:  # a section's own __post_init__ checks its values (subclass sections use this)
        return cls(**value)
    except (ValueError, TypeError) as error:
        key, sep, problem = _first_line(error).partition(": ")
        if sep and key in fields:  # "field: problem" names the key
            err(f"{section}.{key}", problem)
        else:
            err(section, _first_line(error))
        return None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _has_required(cls) -> bool:
    return any(_is_required(f) for f in dataclasses.fields(cls))


def _check_extra_sections(extra_sections: dict[str, type] | None) -> dict[str, type]:
    """A subclass's `recipe_sections` must be dataclasses with new names: a typo here is a programming error."""
    extra_sections = dict(extra_sections or {})
    for key, section in extra_sections.items():
        if key in SECTIONS or key == "extra":
            raise ValueError(f"recipe_sections: {key!r} is a built-in section; choose another name")
        if not (isinstance(section, type) and dataclasses.is_dataclass(section)):
            raise TypeError(f"recipe_sections[{key!r}]: expected a dataclass, got {type(section).__name__}")
    return extra_sections


def _check_metric_names(names: list[str], err) -> None:
    from .metrics import METRICS

    for name in names:
        if name.startswith("evaluate:"):
            # evaluate.load runs a metric script, and a recipe is data that must never make the package run code.
            err("eval.metrics", f"{name!r}: recipes cannot load evaluate scripts (that would run code); override "
                "IA3Seq2SeqTrainer.build_compute_metrics and call ia3_trainer.metrics.evaluate_metric there")
        elif name not in METRICS:
            err("eval.metrics", f"unknown metric {name!r}{_did_you_mean(name, METRICS)} (known: {', '.join(METRICS)})")
    if len(set(names)) != len(names):
        err("eval.metrics", f"has duplicates: {names}")


def _check_passthrough(raw: dict, section: str, types_: dict[str, Any], reserved: set[str], err) -> dict | None:
    value = raw.get(section)
    if value is None:
        return {}
    if not isinstance(value, dict):
        err(section, f"must be a JSON object, got {_type_name(value)}")
        return None
    ok = True
    for key, item in value.items():
        if key in reserved:
            err(f"{section}.{key}", "set by the trainer; remove it from the recipe")
            ok = False
        elif key not in types_:
            err(f"{section}.{key}", f"unknown key{_did_you_mean(key, types_, prefix=section + '.')}")
            ok = False
        else:
            problem = _check_type(item, types_[key])
            if problem:
                err(f"{section}.{key}", problem)
                ok = False
    return value if ok else None


def _check_type(value: Any, annotation: Any) -> str | None:
    """Return a problem message when `value` (JSON data) does not fit `annotation`, else None."""
    if _fits(value, annotation):
        return None
    return f"expected {_describe(annotation)}, got {_type_name(value)} {json.dumps(value, default=str)[:60]}"


def _fits(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in _enum_over_str(args))
    if origin is Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, list) and (not args or all(_fits(item, args[0]) for item in value))
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(isinstance(k, str) and _fits(v, args[1]) for k, v in value.items())
        )
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple, set):
        return isinstance(value, list)
    if annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, (list, dict)):  # unhashable, so `in` a set would raise TypeError; never a member
            return False
        return value in {member.value for member in annotation} or value in annotation.__members__
    if isinstance(annotation, type) and annotation.__module__ == "pathlib":
        return isinstance(value, str)
    # Objects a JSON file cannot hold (GenerationConfig, callables): only null fits.
    return value is None


def _enum_over_str(args: tuple) -> tuple:
    """`SchedulerType | str` accepts only the enum's values: the `str` is there for callers, not free text."""
    if any(isinstance(arg, type) and issubclass(arg, enum.Enum) for arg in args):
        return tuple(arg for arg in args if arg is not str)
    return args


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in _enum_over_str(args)))
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in args)
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        return "a list" + (f" of {_describe(args[0])}" if args else "")
    if origin is dict or annotation is dict:
        return "an object"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(json.dumps(member.value) for member in annotation)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(annotation, "null")


# load_dataset keywords that carry credentials: a recipe is saved as recipe.json and pushed with the adapter.
_SECRET_LOAD_KWARGS = ("token", "use_auth_token", "storage_options", "download_config")


def _check_data_values(data: DataSection, err) -> None:
    for key in _SECRET_LOAD_KWARGS:
        if key in data.load_kwargs:
            err(f"data.load_kwargs.{key}", "not allowed: a recipe is saved as recipe.json and pushed with the "
                "adapter, so it never holds credentials; set HF_TOKEN or run `hf auth login`")
    if isinstance(data.validation_size, float) and not 0 <= data.validation_size < 1:
        err("data.validation_size", f"a fraction must be in [0, 1), got {data.validation_size}; or give a count")
    if isinstance(data.validation_size, int) and data.validation_size < 0:
        err("data.validation_size", f"must be >= 0, got {data.validation_size}")
    for key in ("max_source_length", "max_target_length", "max_train_samples", "max_eval_samples"):
        value = getattr(data, key)
        if value is not None and value < 1:
            err(f"data.{key}", f"must be >= 1, got {value}")
    if data.label_names is not None:
        if not data.label_names:
            err("data.label_names", "is empty; list the label texts, or remove the key")
        elif len(set(data.label_names)) != len(data.label_names):
            err("data.label_names", f"has duplicates: {data.label_names}")
        elif any(not name.strip() for name in data.label_names):
            err("data.label_names", "has an empty label text")
    if data.label_separator == "":
        err("data.label_separator", "is empty; give the separator, e.g. \"@\", or remove the key")
    if data.text_column == data.label_column:
        err("data.label_column", f"is the same column as data.text_column ({data.text_column!r})")


def _check_ia3_values(ia3: dict, err) -> None:
    targets, feedforward = ia3.get("target_modules"), ia3.get("feedforward_modules")
    if isinstance(targets, list) and not targets:
        err("ia3.target_modules", "is empty; list module names, or null for peft's default")
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        err("ia3.feedforward_modules", f"must be a subset of target_modules {sorted(targets)}")
    if feedforward and targets is None:
        err("ia3.feedforward_modules", "is set but target_modules is null; set ia3.target_modules too")


@functools.cache
def _ia3_field_types() -> dict[str, Any]:
    from peft import IA3Config

    return _init_field_types(IA3Config)


@functools.cache
def _training_field_types() -> dict[str, Any]:
    from .training_args import IA3TrainingArguments

    return _init_field_types(IA3TrainingArguments)


def _init_field_types(cls) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: accept any JSON value, the class checks it
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
