"""The recipe's `training.output_dir`: a folder the run owns, never one it reads from.

A run writes its adapter, `README.md`, `recipe.json` and checkpoints into its output folder (and `--overwrite`
removes them), so `check_output_dir` refuses `/`, the home folder, and any folder that is or holds the recipe file,
the local model or tokenizer, or the data files.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

from ia3_trainer.errors import RecipeError
from ia3_trainer.recipe.schema import Problems
from ia3_trainer.recipe.sections import DataSection, ModelSection


def check_output_dir(output_dir: Any, name: str, source: str | None, model: ModelSection, data: DataSection,
                     problems: Problems) -> None:
    """Refuse a `training.output_dir` that is not a folder of the run's own: a run writes its adapter, `README.md`,
    `recipe.json` and checkpoints there (and `--overwrite` removes them), so it must not be `/`, the home folder, or
    a folder that is or holds what the run reads: the recipe file, the local model or tokenizer, the data files."""
    if not isinstance(output_dir, str) or not output_dir:
        return
    try:
        out = resolved(output_dir, "training.output_dir")
        folders = _read_folders(source, model, data, out)
    except RecipeError as error:
        key, _, problem = str(error).partition(": ")
        problems.add(key, problem)
        return
    what = None
    if out == Path(out.anchor):
        what = "is the filesystem root"
    elif out == Path.home().resolve():
        what = "is the home folder"
    else:
        for path, described in folders:
            if out == path or out in path.parents:
                what = f"is the {described}" if out == path else f"holds the {described}, {path}"
                break
    if what is not None:
        problems.add("training.output_dir", f"{out} {what}; a run owns its output folder and writes its adapter, "
                     "README.md, recipe.json and checkpoints there: set training.output_dir to a new folder, e.g. "
                     f"outputs/{name}")


def resolved(path: str | Path, key: str) -> Path:
    """`path` made absolute, `~` expanded and links followed; a symlink loop (a link that leads back to itself) is a
    `RecipeError` of `key` (Python 3.11 and 3.12 raise `RuntimeError` for it, 3.13 an `OSError` with `ELOOP`)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as error:
        if isinstance(error, OSError) and error.errno != errno.ELOOP:
            raise
        raise RecipeError(key=key, problem=f"{path} is a symlink loop (a link that leads back to itself)",
                          fix="replace the link with the file or folder it should name") from error


def _saved_by_run(recipe_file: Path, out: Path) -> bool:
    """`recipe_file` is the `recipe.json` a run saved in `out` beside its adapter, or in one of its checkpoints."""
    folder = recipe_file.parent
    if recipe_file.name != "recipe.json":
        return False
    if folder == out:
        return (out / "adapter_config.json").is_file() or (out / "run.json").is_file()
    return folder.parent == out and re.match(r"checkpoint-\d+$", folder.name) is not None


def _read_folders(source: str | None, model: ModelSection, data: DataSection, out: Path) -> list[tuple[Path, str]]:
    """The local folders a run reads from, each with what it holds."""
    folders = []
    # A run's own recipe.json (beside its adapter, or in one of its checkpoints) names that run's folder: training
    # from it again is the run folder's rules to judge (--resume, --overwrite), not a recipe folder taken over.
    if source is not None and not _saved_by_run(Path(source).resolve(), out):
        folders.append((Path(source).resolve().parent, "folder of the recipe file"))
    for key in ("name_or_path", "tokenizer_name_or_path"):
        value = getattr(model, key)
        if isinstance(value, str) and value and Path(value).expanduser().is_dir():
            folders.append((resolved(value, f"model.{key}"), f"model folder (model.{key})"))
    if isinstance(data.path, str) and Path(data.path).expanduser().exists():
        local = resolved(data.path, "data.path")
        folders.append((local if local.is_dir() else local.parent, "data folder (data.path)"))
    files = data.data_files
    files = list(files.values()) if isinstance(files, dict) else [files]
    for entry in files:
        for file in entry if isinstance(entry, list) else [entry]:
            if not isinstance(file, str) or not file:
                continue
            file = file.rpartition("::")[2]  # zip://member::archive.zip: the archive
            if "://" not in file:  # URLs and hf:// paths are not local
                folder = resolved(file, "data.data_files").parent
                folders.append((folder, "folder of the data files (data.data_files)"))
    return folders
