"""What the `ia3` and `training` sections may hold: the keyword arguments of `peft.IA3Config` and
[`IA3TrainingArguments`] with their types, which `schema.check_fields` checks a section against.

Reading them off the classes imports peft, transformers and torch: about 4 s on a 2-core CPU, most of what
`ia3-trainer validate` took (issue #18). So they are also stored in `field_types.json`, with the versions of peft and
transformers they were read from, and read from there when the installed ones are the same minor releases (the
range `pyproject.toml` allows); with any other version the classes themselves are read.
`python scripts/store_field_types.py` writes the file again, and `tests/test_recipe.py` checks that it says what the
classes say.

The file holds each type as JSON that `check_type` reads the same way: `"int"`, `{"union": [...]}`,
`{"literal": [...]}`, `{"list": item}`, `{"dict": value}`, `{"enum": name, "members": {name: value}}`, `"path"`, and
`{"object": name}` for a class that JSON cannot hold (`GenerationConfig`), where only null fits.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import pathlib
import types
import typing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from ia3_trainer.jsonfiles import write_json


STORED = Path(__file__).with_name("field_types.json")
LIBRARIES = ("peft", "transformers")  # the versions the stored types hold for
_SCALARS = {"any": Any, "bool": bool, "int": int, "float": float, "str": str, "null": type(None), "list": list,
            "dict": dict, "path": pathlib.Path}


@functools.cache
def ia3_field_types() -> dict[str, Any]:
    """`peft.IA3Config`'s keyword arguments and their types: what the `ia3` section may hold."""
    stored = stored_field_types()
    if stored is not None:
        return stored["ia3"]
    from peft import IA3Config

    return read_field_types(IA3Config)


@functools.cache
def training_field_types() -> dict[str, Any]:
    """[`IA3TrainingArguments`]' keyword arguments and their types: what the `training` section may hold."""
    stored = stored_field_types()
    if stored is not None:
        return stored["training"]
    from ia3_trainer.recipe.training_args import IA3TrainingArguments

    return read_field_types(IA3TrainingArguments)


def read_field_types(cls) -> dict[str, Any]:
    """The keyword arguments of the dataclass `cls` and their types, read off the class."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: accept any JSON value, the class checks it
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


@functools.cache
def stored_field_types() -> dict[str, dict[str, Any]] | None:
    """`{"ia3": ..., "training": ...}` from `field_types.json`, or None when it was stored for other versions of the
    libraries than the installed ones (or cannot be read)."""
    try:
        stored = json.loads(STORED.read_text(encoding="utf-8"))
        if releases(stored["versions"]) != releases(library_versions()):
            return None
        return {section: {name: from_json(item) for name, item in stored[section].items()}
                for section in ("ia3", "training")}
    except (OSError, ValueError, KeyError, TypeError, PackageNotFoundError):
        return None


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries whose classes the types are read from (`LIBRARIES`)."""
    return {name: version(name) for name in LIBRARIES}


def releases(versions: dict[str, str]) -> dict[str, str]:
    """The minor release of each version (`5.24.1` -> `5.24`): a patch release keeps the stored types."""
    return {name: ".".join(text.split(".")[:2]) for name, text in versions.items()}


def store_field_types() -> Path:
    """Write `field_types.json` from the classes, with the installed versions of the libraries."""
    from peft import IA3Config

    from ia3_trainer.recipe.training_args import IA3TrainingArguments

    sections = {"ia3": read_field_types(IA3Config), "training": read_field_types(IA3TrainingArguments)}
    return write_json(STORED, {"versions": library_versions(), **{
        section: {name: to_json(annotation) for name, annotation in fields.items()}
        for section, fields in sections.items()}})


def to_json(annotation: Any) -> Any:
    """The type annotation `annotation` as JSON data (see the module's docstring)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    for name, scalar in _SCALARS.items():
        if annotation is scalar:
            return name
    if annotation is object:
        return "any"
    if origin in (typing.Union, types.UnionType):
        return {"union": [to_json(arg) for arg in args]}
    if origin is Literal:
        return {"literal": list(args)}
    if origin in (list, tuple, set) or annotation in (tuple, set):
        return {"list": to_json(args[0])} if args else "list"
    if origin is dict:
        return {"dict": to_json(args[1])} if args else "dict"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"enum": annotation.__name__, "members": {k: m.value for k, m in annotation.__members__.items()}}
    if isinstance(annotation, type) and annotation.__module__ == "pathlib":
        return "path"
    return {"object": getattr(annotation, "__name__", str(annotation))}


def from_json(data: Any) -> Any:
    """The type annotation that `to_json` wrote as `data`, as `check_type` reads it: an enum with the same names and
    values, and None for a class JSON cannot hold (only null fits either)."""
    if isinstance(data, str):
        return _SCALARS[data]
    if "union" in data:
        return typing.Union[tuple(from_json(arg) for arg in data["union"])]  # noqa: UP007 (no X | Y of a tuple)
    if "literal" in data:
        return Literal[tuple(data["literal"])]
    if "list" in data:
        return list[from_json(data["list"])]
    if "dict" in data:
        return dict[str, from_json(data["dict"])]
    if "enum" in data:
        return enum.Enum(data["enum"], data["members"])
    if "object" in data:
        return type(None)
    raise ValueError(f"unknown stored type {data!r}")
