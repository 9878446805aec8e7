"""mkdocs hook: render the recipe reference from the recipe's own field definitions, so it cannot drift.

A page that holds the line `<!-- recipe-reference -->` gets, in its place, one table per recipe section: every field
of the section dataclasses (`ia3_trainer.Recipe`'s field types), its type, its default and its `metadata["help"]`;
for `training`, the fields `ia3_trainer.IA3TrainingArguments` adds or whose default it changes; for `ia3`, the
`peft.IA3Config` fields a recipe may set.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path


MARKER = "<!-- recipe-reference -->"
ROOT = Path(__file__).resolve().parents[2]  # the repository: document its package, not another installed copy


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


def render() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from peft import IA3Config

    import ia3_trainer

    # Not exported at top level: what a recipe may not set, and the metric names, found where they are defined.
    IA3_RESERVED, METRICS, TRAINING_RESERVED = (_internal(ia3_trainer, name)
                                                for name in ("IA3_RESERVED", "METRICS", "TRAINING_RESERVED"))

    recipe_types = typing.get_type_hints(ia3_trainer.Recipe)
    out = []
    top = [f for f in dataclasses.fields(ia3_trainer.Recipe) if f.name not in ("ia3", "training")
           and not _is_dataclass(recipe_types[f.name]) and _is_recipe_key(ia3_trainer, f)]
    out += ["## Top level", "", _table([(f, recipe_types[f.name]) for f in top], helps=_TOP_LEVEL_HELP)]
    for f in dataclasses.fields(ia3_trainer.Recipe):
        kind = recipe_types[f.name]
        if _is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            doc = (kind.__doc__ or "").strip().split("\n")[0]
            out += [f"## `{f.name}`", "", doc, "", _table([(g, hints[g.name]) for g in dataclasses.fields(kind)])]
            if f.name == "eval":
                out += ["Metric names `eval.metrics` may list:", "", "| metric | what it reports |", "|---|---|"]
                out += [f"| `{name}` | {_cell(text)} |" for name, text in METRICS.items()]
                out.append("")
        elif f.name == "ia3":
            fields = [g for g in dataclasses.fields(IA3Config) if g.init and g.name not in IA3_RESERVED]
            hints = typing.get_type_hints(IA3Config)
            out += ["## `ia3`", "", "The keyword arguments of `peft.IA3Config` (peft's own help below). A `null` "
                    "`target_modules` takes the model family's defaults ([Architectures](architectures.md)). Set by "
                    "the trainer, so refused in a recipe: " + ", ".join(f"`{k}`" for k in sorted(IA3_RESERVED)) + ".",
                    "", _table([(g, hints.get(g.name, typing.Any)) for g in fields])]
        elif f.name == "training":
            cls = ia3_trainer.IA3TrainingArguments
            own = cls.__dict__.get("__annotations__", {})
            hints = typing.get_type_hints(cls)
            fields = [g for g in dataclasses.fields(cls) if g.name in own]
            out += ["## `training`", "",
                    "Any field of transformers' [`Seq2SeqTrainingArguments`](https://huggingface.co/docs/transformers/"
                    "main_classes/trainer#transformers.Seq2SeqTrainingArguments), fed to `ia3_trainer."
                    "IA3TrainingArguments`. The fields it adds, and those whose default it changes:", "",
                    _table([(g, hints[g.name]) for g in fields]),
                    "Refused in a recipe (pushing goes through the `hub` section): "
                    + ", ".join(f"`{k}` (use {v})" for k, v in TRAINING_RESERVED.items())
                    + ", and every other `hub_*` option.", ""]
    return "\n".join(out)


_TOP_LEVEL_HELP = {
    "name": "Name of the run; the default `training.output_dir` is `outputs/<name>`.",
    "description": "One line: model, dataset, and the command that runs it.",
}


def _internal(ia3_trainer, name: str):
    """A module-level name of the package that is not exported: looked up in the module that defines the section
    classes, then in every module of the package, so that moving modules does not break the build."""
    import importlib
    import pkgutil

    sections = importlib.import_module(ia3_trainer.ModelSection.__module__)
    if hasattr(sections, name):
        return getattr(sections, name)
    for info in pkgutil.walk_packages(ia3_trainer.__path__, prefix="ia3_trainer."):
        module = importlib.import_module(info.name)
        if name in vars(module):
            return vars(module)[name]
    raise LookupError(f"no module of ia3_trainer defines {name}: update docs/hooks/recipe_reference.py")


def _is_recipe_key(ia3_trainer, f) -> bool:
    """Whether a recipe file may hold this field of `Recipe` (some fields are the loader's, e.g. where it was read
    from): the recipe's own check says, given the field at its default value."""
    minimal = {"model": {"name_or_path": "t5-small"}, "data": {"path": "json"}}
    try:
        ia3_trainer.Recipe.from_dict({**minimal, f.name: _default_value(f)})
    except ia3_trainer.RecipeError as error:
        return f"{f.name}:" not in str(error)
    return True


def _default_value(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _is_dataclass(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _table(rows, helps=None) -> str:
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for f, kind in rows:
        text = (helps or {}).get(f.name) or f.metadata.get("help", "")
        lines.append(f"| `{f.name}` | {_cell(_type_name(kind))} | {_cell(_default(f))} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def _default(f) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = _default_value(f)
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value!r}`"


def _type_name(kind) -> str:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if kind is type(None):
        return "null"
    if kind is typing.Any:
        return "any"
    if origin is typing.Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, dict, tuple, set):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
        getattr(kind, "__name__", str(kind)), getattr(kind, "__name__", str(kind))
    )


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
