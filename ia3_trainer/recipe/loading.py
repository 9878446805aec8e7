"""Recipe schema: load a JSON recipe, apply overrides, and check every field before any model is loaded.

A recipe has one section per object it feeds: `model` (the base model and tokenizer), `data` (the
`datasets.load_dataset` call and how examples become model inputs), `ia3` (a `peft.IA3Config`), `training`
(an [`IA3TrainingArguments`]), `eval` (the trainer's `compute_metrics`) and `hub` (the
[`PushAdapterToHubCallback`]); a trainer subclass may declare more (`recipe_sections`). `Recipe.from_dict` collects
every problem and raises one [`RecipeError`] that lists them, each as `<where>: <dotted.key>: <problem>; <fix>`,
where `<where>` is the recipe file, or `--set` for a value an override gave. A recipe describes a run: checking it
builds the value objects its sections feed (`IA3TrainingArguments`, `peft.IA3Config`; not with `library_checks=False`,
which imports no library), never a model, trainer or callback.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia3_trainer.errors import RecipeError, first_line, redact_urls
from ia3_trainer.jsonfiles import read_json, write_json
from ia3_trainer.recipe.field_types import ia3_field_types, training_field_types
from ia3_trainer.recipe.output_dir import check_output_dir
from ia3_trainer.recipe.overrides import OVERRIDE, SECTION_CLASSES, SECTIONS, check_extra_sections, override_pairs
from ia3_trainer.recipe.overrides import apply_overrides as apply_overrides
from ia3_trainer.recipe.schema import (
    Problems,
    check_fields,
    check_json_data,
    check_section,
    did_you_mean,
    has_required,
    path_fields,
    resolve_path,
    type_name,
    well_typed_fields,
)
from ia3_trainer.recipe.sections import (
    IA3_RESERVED,
    RECIPE_SECTIONS,
    TRAINING_PATH_FIELDS,
    DataSection,
    EvalSection,
    HubSection,
    ModelSection,
    check_ia3_values,
    check_training_values,
)
from ia3_trainer.recipe.sections import check_repo_id as check_repo_id
from ia3_trainer.recipe.shipped import list_shipped_recipes as list_shipped_recipes
from ia3_trainer.recipe.shipped import recipe_file


# A recipe's `name` is one path component (the default output_dir is outputs/<name>): no separator, no `..`, no
# whitespace or control characters, and short enough for every file system.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


def safe_name(text: str) -> str:
    """`text` made a valid recipe `name`: each run of other characters becomes `-` (e.g. a recipe file's stem)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("._-")[:100].rstrip("._-")
    return name or "ia3-run"




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
        cls, raw: dict, source: str | Path | None = None, extra_sections: dict[str, type] | None = None, *,
        overridden: dict[str, str] | None = None, portable: bool = False, library_checks: bool = True,
    ) -> Recipe:
        """Check `raw` against the schema and return a `Recipe`, or raise one `RecipeError` listing every problem.

        `extra_sections` maps more section names to dataclasses (a trainer subclass's `recipe_sections`); they are
        checked like the built-in ones and land in `recipe.extra`. Any other unknown section is still an error.
        `overridden` maps the dotted keys that overrides set to where they came from (`"--set"`), so that their
        problems are blamed there and not on `source`. `portable=True` leaves out the checks that depend on this
        machine (building `IA3TrainingArguments`: bf16 support, DeepSpeed, config files), for a `recipe.json`
        written elsewhere. `library_checks=False` leaves out the checks that transformers and peft make themselves
        when `IA3TrainingArguments` and `peft.IA3Config` are built (combinations such as `load_best_model_at_end`
        with different save and eval strategies, and the machine's), so that nothing imports torch, transformers or
        peft: `ia3-trainer validate` checks this way, and `train` makes the rest of the checks before any model loads.
        """
        extra_sections = check_extra_sections(extra_sections)
        sections = (*SECTIONS, *extra_sections)
        where = str(source) if source is not None else "<recipe>"
        problems = Problems(where, overridden)
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: the recipe must be a JSON object, got {type_name(raw)}")
        check_json_data(raw, problems)
        problems.raise_if_any()  # what follows copies and walks the values; it cannot on these
        for key in raw:
            if key not in sections:
                problems.add(key, lambda key=key: f"unknown section{did_you_mean(key, sections)}")

        name = raw.get("name", safe_name(Path(source).stem) if source is not None else "ia3-run")
        if not isinstance(name, str) or not name:
            problems.add("name", "must be a non-empty string")
        elif not NAME.match(name):
            problems.add("name", f"{name!r} is not one folder name of letters, digits, '.', '_' and '-' starting with "
                         f"a letter or digit (the run's folder is outputs/<name>); use e.g. {safe_name(name)!r}")
        description = raw.get("description")
        if description is not None and not isinstance(description, str):
            problems.add("description", f"must be a string, got {type_name(description)}")

        checked = {key: check_section(section.checked_by, raw, key, problems, required=section.required)
                   for key, section in RECIPE_SECTIONS.items() if section.checked_by is not None}
        extra = {key: check_section(section, raw, key, problems, required=has_required(section))
                 for key, section in extra_sections.items()}
        ia3 = check_fields(raw, "ia3", ia3_field_types(), IA3_RESERVED, problems)
        # Trainer's push options are known fields, so they are type-checked here and refused just below.
        training = check_fields(raw, "training", training_field_types(), set(), problems)
        # Ranges too, of the values whose type is right, when others in the section are wrong: one round.
        check_training_values(training if training is not None
                              else well_typed_fields(raw, "training", training_field_types(), set()), problems)
        check_ia3_values(ia3 if ia3 is not None else well_typed_fields(raw, "ia3", ia3_field_types(), IA3_RESERVED),
                         problems)
        problems.raise_if_any()

        training = dict(training)
        # A section left out is its defaults (a required one raised above).
        checked = {key: value or SECTION_CLASSES[key]() for key, value in checked.items()}
        if source is not None:  # ./ and ../ in the file are relative to the file
            base = Path(source).resolve().parent
            for section in (*checked.values(), *extra.values()):
                _resolve_path_fields(section, base)
            training.update({key: resolve_path(training[key], base) for key in TRAINING_PATH_FIELDS
                             if isinstance(training.get(key), str)})
        training.setdefault("output_dir", str(Path("outputs") / name))
        recipe = cls(
            **checked, name=name, description=description, ia3=dict(ia3), training=training,
            extra={key: value or extra_sections[key]() for key, value in extra.items()},
            source=None if source is None else str(source),
        )
        recipe._check(problems, portable=portable, library_checks=library_checks)
        return recipe

    def validate(self) -> None:
        """Check what spans sections, and build the value objects the sections feed (`IA3TrainingArguments`,
        `peft.IA3Config`) so that they check their own values; no model, trainer or callback is built."""
        self._check(Problems(self.source or "<recipe>"))

    def _check(self, problems: Problems, portable: bool = False, library_checks: bool = True) -> None:
        args = None
        build_args = library_checks and not portable
        unreadable = self._check_settings_files(problems) if not portable else False
        if build_args and not unreadable:
            try:
                args = self.training_args()
            except RecipeError:  # not the recipe's problem (a launcher's environment variable): said as it is
                raise
            except (ValueError, TypeError, OverflowError) as error:
                problems.add_to_section("training", first_line(error))
            except ImportError as error:  # e.g. training.deepspeed without the deepspeed package
                problems.add_to_section("training", f"{first_line(error)}; install it, or remove the setting that "
                                        "needs it")
            except OSError as error:  # accelerator_config, deepspeed and fsdp_config may name a JSON file to read
                keys = [key for key, value in self.training.items() if value == error.filename]
                problems.add("training" + (f".{keys[0]}" if keys else ""), f"cannot read {error.filename!r} "
                             f"({error.strerror}); give the path of a JSON file, or the settings as an object")
        if library_checks:
            try:
                self.ia3_config()
            except (ValueError, TypeError) as error:
                problems.add_to_section("ia3", first_line(error))
        if args is not None or not build_args:  # else the training section's own problem is reported, and is enough
            strategy = getattr(args, "eval_strategy", self.training.get("eval_strategy", "no"))
            strategy = str(getattr(strategy, "value", strategy))
            best = getattr(args, "load_best_model_at_end", self.training.get("load_best_model_at_end", False))
            has_validation = self.data.validation_split is not None or self.data.validation_size > 0
            if strategy != "no" and not has_validation:
                problems.add("training.eval_strategy", f"is {strategy!r} but there is no validation data; set "
                             "data.validation_split or data.validation_size > 0, or eval_strategy 'no'")
            if best and not has_validation:
                problems.add("training.load_best_model_at_end", "needs validation data; set data.validation_size > 0")
        if not portable:  # a saved recipe.json names folders of the machine it was trained on
            check_output_dir(self.training.get("output_dir"), self.name, self.source, self.model, self.data, problems)
        problems.raise_if_any()

    def _check_settings_files(self, problems: Problems) -> bool:
        """Whether a JSON file of settings the training section names (accelerator_config, deepspeed, fsdp_config)
        does not read; its problem is the key's, blamed where the key was given (the recipe file or --set)."""
        unreadable = False
        for key in SETTINGS_FILES:
            value = self.training.get(key)
            if isinstance(value, str) and Path(value).expanduser().is_file():
                try:
                    read_json(Path(value).expanduser())
                except (OSError, ValueError) as error:
                    problems.add(f"training.{key}", f"{first_line(error)}; give the path of a JSON file of settings, "
                                 "or the settings as an object")
                    unreadable = True
        return unreadable

    def training_args(self):
        """The [`IA3TrainingArguments`] of the `training` section."""
        from ia3_trainer.recipe.training_args import IA3TrainingArguments

        # A JSON 0 for a float field stays an int, which torch's optimizers refuse for adam_beta1/2.
        floats = {key for key, annotation in training_field_types().items() if annotation is float}
        return IA3TrainingArguments(**{
            key: float(value) if key in floats and type(value) is int else value
            for key, value in self.training.items()
        })

    def ia3_config(self):
        """The `peft.IA3Config` of the `ia3` section (unset fields take peft's per-architecture defaults)."""
        from peft import IA3Config

        return IA3Config(task_type="SEQ_2_SEQ_LM", **self.ia3)

    def to_dict(self) -> dict:
        """The resolved recipe as plain JSON data (what `recipe.json` holds)."""
        sections = {key: getattr(self, key) for key in RECIPE_SECTIONS}
        return {
            "name": self.name,
            "description": self.description,
            **{key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
               for key, value in sections.items()},
            **{key: dataclasses.asdict(value) for key, value in self.extra.items()},
        }

    def saved_dict(self) -> dict:
        """What a run saves and a push uploads of the recipe (`recipe.json`, the model card): `to_dict()`
        with the credentials taken out of every URL in it (`errors.redact_urls`), so that it says where the data came
        from without the secret. The recipe file itself keeps working."""
        return redact_urls(self.to_dict())

    def save(self, folder: str | Path) -> Path:
        """Write the resolved recipe as `recipe.json` in `folder` (`saved_dict()`: no token and no credential of a
        URL in it), whole or not at all: a full disk leaves the previous file, never half a recipe."""
        return write_json(Path(folder) / "recipe.json", self.saved_dict())


def load_recipe(
    name_or_path: str | Path | dict,
    overrides: dict[str, Any] | list[str] | None = None,
    extra_sections: dict[str, type] | None = None,
    *,
    library_checks: bool = True,
) -> Recipe:
    """Load a recipe by shipped name (`"phrasebank"`), file path, or dict; apply `overrides`; validate it.

    `overrides` is a `{"training.learning_rate": 1e-2}` mapping or a list of `"key=value"` strings as given on the
    command line (each value parsed as JSON, else kept as a string). A problem in an override's value is blamed on
    `--set`, not on the file. `extra_sections` declares more sections (see `Recipe.from_dict`); a trainer subclass
    passes its `recipe_sections`. `library_checks=False` leaves out what transformers and peft check themselves and
    imports none of them (see `Recipe.from_dict`).
    """
    if isinstance(name_or_path, dict):
        raw, source = copy.deepcopy(name_or_path), None
    else:
        source = recipe_file(name_or_path)
        raw = _read_recipe_file(source)
    overridden = {}
    if overrides:
        overrides = dict(override_pairs(overrides))  # parsed once; the last value of a key given twice wins
        raw = apply_overrides(raw, overrides, source=source, extra_sections=extra_sections)
        overridden = dict.fromkeys(overrides, OVERRIDE)
    return Recipe.from_dict(raw, source=source, extra_sections=extra_sections, overridden=overridden,
                            library_checks=library_checks)


def load_saved_recipe(folder: str | Path, extra_sections: dict[str, type] | None = None) -> Recipe | None:
    """The validated `recipe.json` of an adapter folder (a run's `output_dir`, a checkpoint, a Hub download), or None
    when there is none. A problem in it is a [`RecipeError`] naming the file and the key.

    Its paths are already absolute and need not exist on this machine, and the checks that depend on the machine
    are left out (see `Recipe.from_dict(portable=True)`). Sections of a trainer subclass that are not in
    `extra_sections` are set aside: nothing that reads a saved recipe uses them.
    """
    path = Path(folder) / "recipe.json"
    if not path.is_file():
        return None
    raw = _read_recipe_file(path)
    if isinstance(raw, dict):
        known = (*SECTIONS, *(extra_sections or {}))
        raw = {key: value for key, value in raw.items() if key in known or not isinstance(value, dict)}
    return Recipe.from_dict(raw, source=path, extra_sections=extra_sections, portable=True)


# --- helpers -----------------------------------------------------------------------------------------------------


def _read_recipe_file(path: Path) -> Any:
    try:
        return read_json(path)
    except (ValueError, OSError) as error:
        raise RecipeError(str(error)) from error


def _resolve_path_fields(section: Any, base: Path) -> None:
    if section is not None:
        for name in path_fields(type(section)):
            setattr(section, name, resolve_path(getattr(section, name), base))


# The training keys that may name a JSON file of settings, which TrainingArguments reads.
SETTINGS_FILES = ("accelerator_config", "deepspeed", "fsdp_config")
