"""`ia3-trainer init`: write a starter recipe for a local data file and say what to check."""

from __future__ import annotations

import json
from pathlib import Path

from ia3_trainer.errors import PathError
from ia3_trainer.jsonfiles import write_text
from ia3_trainer.recipe.loading import Recipe


def init_command(args) -> int:
    """`ia3-trainer init`: write a starter recipe for a data file and print what to check."""
    from ia3_trainer.data.starter import starter_recipe

    output = Path(args.output or f"{Path(args.data).stem}-ia3.json")
    _check_replaceable(output, Path(args.data), args.force)
    recipe, notes = starter_recipe(args.data, output, args.text_column, args.label_column, args.model,
                                   label_separator=args.label_separator, encoding=args.encoding)
    text = json.dumps(recipe, indent=2) + "\n"
    # What init writes must validate, as the file it will be (relative paths resolve against it), before it replaces
    # anything with --force.
    Recipe.from_dict(json.loads(text), source=output)
    write_text(output, text)  # makes the folder; a file in the way is one line
    print(f"Wrote {output}")
    print("\n".join(f"  - {note}" for note in notes))
    print("  - training: the PEFT IA3 guide's settings (lr 8e-3, 3 epochs, batch 8); see README 'Recipes'")
    print(f"Next: ia3-trainer validate {output} && ia3-trainer train {output}")
    return 0


def _check_replaceable(output: Path, data: Path, force: bool) -> None:
    """`init` writes a new file, or with `--force` replaces a recipe written before: never the data file it reads, a
    model's `config.json` or any other file that is not a recipe."""
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise PathError(f"--output: {output} exists; choose another file or pass --force")
    if output.is_dir():
        raise PathError(f"--output: {output} is a folder; give the recipe file to write, e.g. "
                                f"{output / (data.stem + '-ia3.json')}")
    if data.exists() and output.resolve() == data.resolve():
        raise PathError(f"--output: {output} is the data file --data reads; write the recipe to another file, "
                              f"e.g. {data.stem}-ia3.json")
    model = next((name for name in ("adapter_config.json", "config.json") if (output.parent / name).is_file()), None)
    if model is not None:
        raise PathError(f"--output: {output} is in a model or adapter folder (it holds {model}); --force "
                              "replaces only a recipe of yours: write the recipe to another file")
    if not _is_recipe(output):
        raise PathError(f"--output: {output} exists and is not a recipe (--force replaces only a recipe "
                              "written before, never a data or model file); choose another file")


def _is_recipe(path: Path) -> bool:
    """Whether `path` holds a recipe: a JSON object with `model` and `data` sections and only sections besides."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("data"), dict)
            and all(isinstance(value, dict) or (key in ("name", "description") and (value is None or isinstance(
                value, str))) for key, value in raw.items()))
