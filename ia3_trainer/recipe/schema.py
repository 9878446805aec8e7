"""The mechanics of checking JSON data against dataclasses: what `ia3_trainer.recipe.loading` builds its schema from.

`check_type` tells whether a JSON value fits a type annotation; `check_section` checks a JSON object against a
dataclass's fields; [`Problems`] collects every problem as one line naming the key, and says where it came from (the
recipe file or an override); `resolve_path` makes `./` paths absolute in the fields marked as paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ia3_trainer.errors import RecipeError, first_line


MAX_NESTING = 32  # real recipes nest 4 levels (data.data_files); deeper data would exhaust the stack downstream
MAX_SHOWN = 10  # problems spelled out in one error; a file with 200,000 unknown keys gets these and a count


def check_json_data(raw: dict, problems: Problems) -> None:
    """Add a problem per top-level key whose value JSON cannot hold or a recipe must not: nesting deeper than
    `MAX_NESTING` (deepcopy, type checks and json.dumps recurse), keys that are not strings, lone surrogates such as
    `"\\ud800"` (not text: printing or saving fails), and NaN or infinite numbers (a dict recipe from Python can
    hold the last three)."""
    for key, value in raw.items():
        # Breadth-first, so the check never recurses itself. Each node comes with the key it is named by in
        # messages: `section.key` for what a section holds, however deep.
        depth, level, leaves, keys = 0, [(str(key), value)], [], [(str(key), key)]
        while level and depth <= MAX_NESTING:
            leaves += [(path, node) for path, node in level if isinstance(node, (str, float))]
            keys += [(path, name) for path, node in level if isinstance(node, dict) for name in node]
            children = [(f"{path}.{name}" if depth == 0 else path, child) for path, node in level
                        if isinstance(node, dict) for name, child in node.items()]
            level = children + [(path, child) for path, node in level if isinstance(node, list) for child in node]
            depth += 1
        not_strings = [(path, name) for path, name in keys if not isinstance(name, str)]
        bad_text = [path for path, leaf in leaves + keys if isinstance(leaf, str) and not _is_text(leaf)]
        not_finite = [(path, leaf) for path, leaf in leaves if isinstance(leaf, float) and not math.isfinite(leaf)]
        if depth > MAX_NESTING:
            problems.add(str(key), f"nests lists and objects over {MAX_NESTING} levels deep; flatten it")
        elif not_strings:
            path, name = not_strings[0]
            problems.add(path, f"keys must be strings, got {type_name(name)} {name!r}")
        elif bad_text:
            problems.add(bad_text[0], "holds a lone surrogate (an escape such as \\ud800), which is not text; "
                         "remove it")
        elif not_finite:
            problems.add(not_finite[0][0], f"must be a finite number, got {not_finite[0][1]}")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- collecting problems ------------------------------------------------------------------------------------------


class Problems:
    """Collect a recipe's problems as `<where>: <dotted.key>: <problem>` lines, then raise them as one RecipeError.

    `where` is the recipe file. `overridden` maps the dotted keys that overrides set to where they were given
    (`"--set"`): a problem in such a key, or in a key below it, is blamed there instead. Only the first `MAX_SHOWN`
    problems are written out (pass a slow message, such as a did-you-mean hint, as a function: it is called only
    then); the rest are counted.
    """

    def __init__(self, where: str, overridden: dict[str, str] | None = None):
        self.where = where
        self.overridden = dict(overridden or {})
        self.lines: list[str] = []
        self.hidden = 0
        self.hidden_where: set[str] = set()

    def add(self, key: str, problem: str | Callable[[], str]) -> None:
        """Add the problem `problem` (a message, or a function that returns it) of the dotted key `key`."""
        if len(self.lines) >= MAX_SHOWN:
            self.hidden += 1
            self.hidden_where.add(self.where_of(key))
            return
        text = problem() if callable(problem) else problem
        self.lines.append(f"{self.where_of(key)}: {key}: {text}")

    def where_of(self, key: str) -> str:
        """Where the value of `key` came from: the override that set it or a key above it, else the recipe file."""
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            given = self.overridden.get(".".join(parts[:end]))
            if given is not None:
                return given
        return self.where

    def add_to_section(self, section: str, problem: str) -> None:
        """Add a problem of `section`'s values together (building the object the section feeds). When its message
        names keys that overrides set in the section, it is the problem of the one named first, blamed where that
        was given; else the section's, blamed on the file."""
        named = {}
        for key in self.overridden:
            match = key.startswith(section + ".") and re.search(rf"\b{re.escape(key.split('.')[1])}\b", problem)
            if match:
                named[key] = match.start()
        self.add(min(named, key=named.get) if named else section, problem)

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        where = self.hidden_where.pop() if len(self.hidden_where) == 1 else self.where
        more = [f"{where}: {self.hidden:,} more problem(s) not shown; fix the ones above and run again"]
        raise RecipeError(self.lines + (more if self.hidden else []))


def did_you_mean(key: str, options, prefix: str = "") -> str:
    """`"; did you mean 'prefix.option'?"` for the option closest to `key`, or `""` when none is close."""
    match = difflib.get_close_matches(str(key), sorted(options), n=1)
    return f"; did you mean {prefix + match[0]!r}?" if match else ""


# --- types --------------------------------------------------------------------------------------------------------


def type_name(value: Any) -> str:
    """The JSON-ish name of `value`'s type, for messages (`null` for None)."""
    return "null" if value is None else type(value).__name__


def check_type(value: Any, annotation: Any) -> str | None:
    """Return a problem message when `value` (JSON data) does not fit `annotation`, else None."""
    if fits(value, annotation):
        return None
    return f"expected {describe(annotation)}, got {type_name(value)} {json.dumps(value, default=str)[:60]}"


def fits(value: Any, annotation: Any) -> bool:
    """Whether the JSON value `value` fits the type annotation `annotation`."""
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in _enum_over_str(args))
    if origin is Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, list) and (not args or all(fits(item, args[0]) for item in value))
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(isinstance(k, str) and fits(v, args[1]) for k, v in value.items())
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


def describe(annotation: Any) -> str:
    """`annotation` in words, as messages say it: `a number`, `one of "a", "b"`, `a list of a string`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(arg) for arg in _enum_over_str(args)))
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in args)
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        return "a list" + (f" of {describe(args[0])}" if args else "")
    if origin is dict or annotation is dict:
        return "an object"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(json.dumps(member.value) for member in annotation)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(annotation, "null")


# --- sections -----------------------------------------------------------------------------------------------------


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def has_required(cls) -> bool:
    return any(is_required(f) for f in dataclasses.fields(cls))


def check_section(cls, raw: dict, section: str, problems: Problems, required: bool):
    """Check `raw[section]` against the dataclass `cls` (keys, required fields, types), then build it so that its
    own `__post_init__` checks its values. Return the instance, or None when there was a problem."""
    value = raw.get(section)
    if value is None:
        if required:
            names = ", ".join(f"{f.name!r}: ..." for f in dataclasses.fields(cls) if is_required(f))
            problems.add(section, f"missing section; add \"{section}\": {{{names}}}")
        return None
    if not isinstance(value, dict):
        problems.add(section, f"must be a JSON object, got {type_name(value)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    ok = True
    for key in value:
        if key not in fields:
            problems.add(f"{section}.{key}", lambda key=key: f"unknown key{did_you_mean(key, fields, section + '.')}")
            ok = False
    for name, f in fields.items():
        if name not in value:
            if is_required(f):
                problems.add(f"{section}.{name}", f"missing required field; {f.metadata['help']}")
                ok = False
            continue
        problem = check_type(value[name], hints[name])
        if problem:
            problems.add(f"{section}.{name}", problem)
            ok = False
    if not ok:
        return None
    try:  # a section's own __post_init__ checks its values: "field: problem" lines name the key
        return cls(**value)
    except (ValueError, TypeError) as error:
        lines = error.errors if isinstance(error, RecipeError) else [first_line(error)]
        for line in lines:
            key, sep, problem = line.partition(": ")
            if sep and key.split(".")[0] in fields:
                problems.add(f"{section}.{key}", problem)
            else:
                problems.add(section, line)
        return None


def check_fields(raw: dict, section: str, field_types: dict[str, Any], reserved: set[str],
                 problems: Problems) -> dict | None:
    """Check the object `raw[section]` whose keys are keyword arguments of a class (`field_types`: name -> type)."""
    value = raw.get(section)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(section, f"must be a JSON object, got {type_name(value)}")
        return None
    ok = True
    for key, item in value.items():
        if key in reserved:
            problems.add(f"{section}.{key}", "set by the trainer; remove it from the recipe")
            ok = False
        elif key not in field_types:
            problems.add(f"{section}.{key}",
                         lambda key=key: f"unknown key{did_you_mean(key, field_types, section + '.')}")
            ok = False
        else:
            problem = check_type(item, field_types[key])
            if problem:
                problems.add(f"{section}.{key}", problem)
                ok = False
    return value if ok else None


def well_typed_fields(raw: dict, section: str, field_types: dict[str, Any], reserved: set[str]) -> dict:
    """The entries of `raw[section]` that `check_fields` found nothing wrong with: their ranges are checked in the
    same pass as the other entries' types, so that every problem is reported at once."""
    value = raw.get(section)
    if not isinstance(value, dict):
        return {}
    return {key: item for key, item in value.items()
            if key in field_types and key not in reserved and not check_type(item, field_types[key])}


# --- paths --------------------------------------------------------------------------------------------------------


def path_fields(cls) -> list[str]:
    """The fields of the dataclass `cls` that hold paths (`metadata={"path": True}`)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("path")]


def _absolute(path: Path) -> Path:
    """`path` with its links followed; a symlink loop as it is written (the checks of the recipe name it)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.normpath(path))


def resolve_path(value: Any, base: Path) -> Any:
    """Make `./x` and `../x` (also in lists, dict values and `zip://member::./archive`) absolute against `base`;
    leave Hub ids, builder names, URLs and absolute paths alone. The paths need not exist."""
    if isinstance(value, str):
        if value.startswith(("./", "../")):
            return str(_absolute(base / value))
        if "::./" in value or "::../" in value:  # zip://member::./archive.zip
            head, _, tail = value.rpartition("::")
            return f"{head}::{_absolute(base / tail)}"
        return value
    if isinstance(value, list):
        return [resolve_path(item, base) for item in value]
    if isinstance(value, dict):
        return {key: resolve_path(item, base) for key, item in value.items()}
    return value
