"""The recipes shipped with the package (`recipes/` in a checkout, `ia3_trainer/recipes` once installed), found
by name: `load_recipe("tiny")`, `ia3-trainer list`."""

from __future__ import annotations

from pathlib import Path

from ia3_trainer.errors import RecipeError


def shipped_recipes_dir() -> Path:
    """Where the shipped recipes are: `recipes/` beside the package in a source checkout (a git worktree too),
    `ia3_trainer/recipes` once installed."""
    package = Path(__file__).resolve().parents[1]
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


def recipe_file(name_or_path: str | Path) -> Path:
    """The recipe file `name_or_path` names: a file, else a shipped recipe of that name; else a [`RecipeError`]
    listing the shipped ones."""
    path = Path(name_or_path)
    shipped = list_shipped_recipes()
    if not path.is_file() and str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    if not path.is_file():
        names = ", ".join(shipped) or "none"
        raise RecipeError(f"{name_or_path}: no such recipe file or shipped recipe (shipped: {names})")
    return path
