"""Dotted-key overrides of a recipe (`--set training.learning_rate=3e-3`, or a dict from Python) and what each
recipe section may hold: the top-level keys, the keys of each section, and a trainer subclass's extra sections."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ia3_trainer.errors import RecipeError
from ia3_trainer.jsonfiles import parse_value
from ia3_trainer.recipe.field_types import ia3_field_types, training_field_types
from ia3_trainer.recipe.schema import Problems, check_json_data, did_you_mean, path_fields, resolve_path, type_name
from ia3_trainer.recipe.sections import IA3_RESERVED, RECIPE_SECTIONS, TRAINING_PATH_FIELDS


SECTIONS = ("name", "description", *RECIPE_SECTIONS)  # every key a recipe may have at its top
SECTION_CLASSES = {key: section.checked_by for key, section in RECIPE_SECTIONS.items() if section.checked_by}
OVERRIDE = "--set"  # where a problem in an override's value is blamed


def apply_overrides(
    raw: dict,
    overrides: dict[str, Any] | list[str],
    source: str | Path | None = None,
    extra_sections: dict[str, type] | None = None,
) -> dict:
    """Return a copy of `raw` with dotted-key overrides applied; a key the schema does not have is an error.

    A `./` or `../` value of a path field is made absolute against the current folder.
    """
    where = str(source) if source is not None else "<recipe>"
    extra_sections = check_extra_sections(extra_sections)
    sections = (*SECTIONS, *extra_sections)
    pairs = override_pairs(overrides)
    problems = Problems(where, {key: OVERRIDE for key, _ in pairs})
    if not isinstance(raw, dict):  # Recipe.from_dict says so
        return raw
    check_json_data(raw, problems)
    problems.raise_if_any()
    result = copy.deepcopy(raw)
    for key, value in pairs:
        parts = key.split(".")
        known = known_keys(parts[0], extra_sections)
        if parts[0] not in sections:
            problems.add(key, lambda part=parts[0]: f"unknown section{did_you_mean(part, sections)}")
            continue
        if known is None:  # name / description
            if len(parts) != 1:
                problems.add(key, f"{parts[0]} is a plain value, set it as {parts[0]}=...")
                continue
            result[parts[0]] = value
            continue
        if len(parts) < 2:
            problems.add(key, f"name a field, e.g. {parts[0]}.{sorted(known)[0]}=...")
            continue
        if parts[1] not in known:
            problems.add(key, lambda parts=parts, known=known:
                         f"unknown key{did_you_mean(parts[1], known, parts[0] + '.')}")
            continue
        if is_path_key(parts, value, extra_sections):
            # A relative path typed on the command line (or passed in Python) means the current folder, not the
            # recipe's.
            value = resolve_path(value, Path.cwd())
        node = result.setdefault(parts[0], {})
        if not isinstance(node, dict):
            problems.add(parts[0], f"must be a JSON object to override {key}")
            continue
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.add(key, f"{part} is not an object, it cannot hold {parts[-1]}")
                break
        else:
            node[parts[-1]] = value
    problems.raise_if_any()
    return result


def known_keys(section: str, extra_sections: dict[str, type] | None = None) -> set[str] | None:
    """The keys `section` may hold (None for the plain values `name` and `description`, and unknown sections)."""
    classes = {**SECTION_CLASSES, **(extra_sections or {})}
    if section in classes:
        return {f.name for f in dataclasses.fields(classes[section])}
    if section == "ia3":
        return set(ia3_field_types()) - IA3_RESERVED
    if section == "training":
        return set(training_field_types())
    return None


def override_pairs(overrides: dict[str, Any] | list[str]) -> list[tuple[str, Any]]:
    if isinstance(overrides, dict):
        for key in overrides:
            if not isinstance(key, str):
                raise RecipeError(f"{OVERRIDE}: {key!r}: keys must be strings (dotted keys, e.g. \"training.seed\"), "
                                  f"got {type_name(key)}")
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if not isinstance(item, str):
            raise RecipeError(f"{OVERRIDE} {item!r}: expected a key=value string, got {type_name(item)}")
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"{OVERRIDE} {item!r}: expected key=value, e.g. training.learning_rate=1e-2")
        pairs.append((key.strip(), parse_value(text)))
    return pairs


def is_path_key(parts: list[str], value: Any, extra_sections: dict[str, type] | None) -> bool:
    if parts[0] == "training":
        return parts[1] in TRAINING_PATH_FIELDS and len(parts) == 2 and isinstance(value, str)
    classes = {**SECTION_CLASSES, **(extra_sections or {})}
    return parts[0] in classes and parts[1] in path_fields(classes[parts[0]])


def check_extra_sections(extra_sections: dict[str, type] | None) -> dict[str, type]:
    """A subclass's `recipe_sections` must be dataclasses with new names: a typo here is a programming error."""
    extra_sections = dict(extra_sections or {})
    for key, section in extra_sections.items():
        if key in SECTIONS or key == "extra":
            raise ValueError(f"recipe_sections: {key!r} is a built-in section; choose another name")
        if not (isinstance(section, type) and dataclasses.is_dataclass(section)):
            raise TypeError(f"recipe_sections[{key!r}]: expected a dataclass, got {type(section).__name__}")
    return extra_sections
