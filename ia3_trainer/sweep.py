"""`ia3-trainer sweep`: train one recipe at every point of a hyperparameter grid, one point after another.

Each point is the recipe with the point's overrides applied and `training.output_dir` set to its own subfolder
(`<output_dir>/learning_rate=0.003`), so checkpoints and adapters never mix: two points never share a folder. Every
point is validated before the first one trains. The results land in `<output_dir>/sweep.json` and print as a table;
a `sweep.json` of another sweep (other points) is its only record, and is replaced only with `overwrite`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import InputError, RecipeError
from .jsonfiles import finite, parse_value, read_json, write_json
from .recipe import OVERRIDE, Recipe, load_recipe
from .runs import check_fresh


SWEEP_FILE = "sweep.json"


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`["training.learning_rate=3e-3,8e-3"]` -> `{"training.learning_rate": [0.003, 0.008]}`.

    Values are split on commas and each parsed as JSON (else kept as a string), like `--set`; a JSON list
    (`key=[[1,2],[3]]`) gives values that themselves hold commas. A malformed item is a `ValueError` naming it.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise InputError(f"--grid {item!r}: expected key=v1,v2,..., e.g. training.learning_rate=3e-3,8e-3")
        if key in grid:
            raise InputError(f"--grid {key}: given twice; list all its values in one --grid")
        if key == "training.output_dir":
            raise InputError("--grid training.output_dir: the sweep sets it (one subfolder per point)")
        parsed = parse_value(text)
        values = parsed if isinstance(parsed, list) else [parse_value(part.strip()) for part in text.split(",")]
        if len(values) != len({json.dumps(v, sort_keys=True) for v in values}):
            raise InputError(f"--grid {key}: has duplicate values {values}")
        grid[key] = values
    if not grid:
        raise InputError("sweep: give at least one --grid key=v1,v2")
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def point_name(point: dict[str, Any]) -> str:
    """Folder name of a point: `learning_rate=0.003,seed=1`, `target_modules=k+v` (the last part of each key; a list
    joined with `+`). Characters unsafe in a file name become `_`, and then a short hash of the exact values is
    added (`name_or_path=org_model-1a2b3c4d`), so that points whose values differ only in those characters
    (`a b` and `a_b`) never share a folder."""

    def text(value: Any) -> str:
        if isinstance(value, list):
            return "+".join(text(item) for item in value)
        return value if isinstance(value, str) else json.dumps(value)

    name = ",".join(f"{key.rsplit('.', 1)[-1]}={text(value)}" for key, value in point.items())
    safe = re.sub(r"[^\w.=,+-]", "_", name)
    if safe == name:
        return name
    exact = json.dumps(point, sort_keys=True, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    return f"{safe}-{hashlib.sha256(exact).hexdigest()[:8]}"


def plan_sweep(
    recipe: str | Path | dict | Recipe,
    grid: dict[str, list[Any]],
    overrides: dict | list[str] | None = None,
    extra_sections: dict[str, type] | None = None,
    *,
    overwrite: bool = False,
) -> list[tuple[dict[str, Any], Recipe]]:
    """Validate every point; return `(point, recipe)` pairs, each recipe writing into its own subfolder (and, with
    `overwrite`, replacing the run there: `training.overwrite_output_dir`)."""
    if isinstance(recipe, Recipe):
        recipe = recipe.to_dict()
    base = load_recipe(recipe, overrides, extra_sections=extra_sections)
    root = Path(base.training["output_dir"])
    plan, errors, folders = [], [], {}
    for point in grid_points(grid):
        name = point_name(point)
        # Names differ in case only on a case-insensitive file system (macOS, Windows): still one folder there.
        other = folders.setdefault(name.casefold(), name)
        if other != name:
            errors.append(f"--grid: sweep points {other} and {name} would share one output folder; make their "
                          "values differ in more than letter case")
            continue
        try:
            point_overrides = {**point, "training.output_dir": str(root / name),
                               **({"training.overwrite_output_dir": True} if overwrite else {})}
            plan.append((point, load_recipe(base.to_dict(), point_overrides, extra_sections=extra_sections)))
        except RecipeError as error:
            # The base recipe and its --set overrides were checked above: a problem an override has here is in
            # a --grid value.
            errors.extend(f"sweep point {name}: {_blame_grid(line)}" for line in error.errors)
    if errors:
        raise RecipeError(errors)
    return plan


def _blame_grid(line: str) -> str:
    return "--grid" + line[len(OVERRIDE):] if line.startswith(OVERRIDE + ": ") else line


def run_sweep(
    recipe: str | Path | dict | Recipe,
    grid: dict[str, list[Any]],
    overrides: dict | list[str] | None = None,
    trainer_cls=None,
    *,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Train and evaluate every point of `grid` in turn; return one row per point (its values, then its metrics).

    `trainer_cls` defaults to [`IA3Seq2SeqTrainer`]; a subclass brings its own recipe sections. `overwrite`
    (`--overwrite`, like `training.overwrite_output_dir`) replaces the runs in the points' folders and a `sweep.json`
    of another sweep; without it either is refused before any point trains.
    """
    import gc

    if trainer_cls is None:
        from .trainer import IA3Seq2SeqTrainer as trainer_cls
    plan = plan_sweep(recipe, grid, overrides, extra_sections=trainer_cls.recipe_sections, overwrite=overwrite)
    root = Path(plan[0][1].training["output_dir"]).parent
    # Every point's folder is checked before the first point trains: a sweep run again into the same folder stops
    # at once, not after training the points before the first taken folder.
    taken = []
    for point, point_recipe in plan:
        try:
            check_fresh(Path(point_recipe.training["output_dir"]), point_recipe.training.get("overwrite_output_dir",
                                                                                               False))
        except FileExistsError as error:
            taken.append(f"sweep point {point_name(point)}: {error}")
    replace = all(point_recipe.training.get("overwrite_output_dir", False) for _, point_recipe in plan)
    taken.extend(_other_sweep(root / SWEEP_FILE, {point_name(point) for point, _ in plan}, replace))
    if taken:
        raise RecipeError(taken)
    rows = []
    for point, point_recipe in plan:
        trainer = trainer_cls.from_recipe(point_recipe)
        metrics = dict(trainer.train().metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.final_eval_metrics())
        rows.append({**point, "output_dir": point_recipe.training["output_dir"], **metrics})
        if trainer.is_world_process_zero():
            write_json(root / SWEEP_FILE, finite(json.loads(json.dumps(rows, default=str))))
        del trainer
        gc.collect()  # free the model before the next point loads its own
    return rows


def _other_sweep(path: Path, names: set[str], overwrite: bool) -> list[str]:
    """Why the sweep may not write `path`: it is a folder, or (unless `overwrite`) it holds anything but the results
    of points named in `names` (this sweep's, from an earlier try)."""
    if path.is_dir():
        return [f"training.output_dir: {path} is a folder; the sweep writes its results there: choose another "
                "training.output_dir"]
    if overwrite or not path.exists():
        return []
    try:
        rows = read_json(path, allow_nan=True)
        points = [Path(row["output_dir"]).name for row in rows]
    except (OSError, ValueError, TypeError, KeyError):
        held = "a file that is not a sweep's results"
    else:
        if set(points) <= names:
            return []
        shown = ", ".join(points[:3]) + (f" and {len(points) - 3} more" if len(points) > 3 else "")
        held = f"the results of another sweep (points {shown})"
    return [f"training.output_dir: {path} holds {held}; pass --overwrite (or set training.overwrite_output_dir) to "
            "replace it, or choose another training.output_dir"]


def format_table(rows: list[dict[str, Any]], grid_keys: list[str]) -> str:
    """A Markdown table: the grid's keys, then the loss and every eval metric (timings left out)."""
    skip = ("_runtime", "_per_second", "_flos")
    metric_keys = [key for key in dict.fromkeys(k for row in rows for k in row)
                   if (key == "train_loss" or key.startswith("eval_")) and not key.endswith(skip)]
    keys = [*grid_keys, *metric_keys]
    header = [key.rsplit(".", 1)[-1] for key in grid_keys] + metric_keys
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in keys) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)
