"""`ia3-trainer sweep`, the planner: it parses `--grid` and `--search`, checks every recipe a search can produce
before the first trial (each grid point, both ends of each range, each choice), names grid points' folders, and
writes the results (`sweep.json`, `results.csv`, a plot). The Optuna study itself is `ia3_trainer.training.search`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ia3_trainer.errors import InputError, RecipeError, redact_urls
from ia3_trainer.jsonfiles import finite, parse_value, read_json, write_json, write_text
from ia3_trainer.recipe.loading import Recipe, load_recipe
from ia3_trainer.recipe.overrides import OVERRIDE
from ia3_trainer.training.runs import check_fresh


SWEEP_FILE = "sweep.json"
RESULTS_CSV = "results.csv"
PLOT_FILE = "search.png"
SEARCH_KINDS = ("log", "float", "int", "choice")
SEARCH_HELP = ("KEY=log:LOW:HIGH (a float on a log scale), KEY=float:LOW:HIGH, KEY=int:LOW:HIGH (ends included) or "
               "KEY=choice:V1,V2 (values parsed as JSON, else text)")


@dataclass(frozen=True)
class SearchParam:
    """One searched recipe key: `kind` is one of `SEARCH_KINDS`; `low`/`high` bound a range, `choices` a choice."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()
    text: str = ""  # the --search item as typed, to name it in messages


def value_text(value: Any) -> str:
    """A value's exact text (a dict's keys sorted): a grid point's key, Optuna's form of a choice."""
    return json.dumps(value, sort_keys=True)


def _split_values(text: str) -> list[Any]:
    parsed = parse_value(text)
    return parsed if isinstance(parsed, list) else [parse_value(part.strip()) for part in text.split(",")]


def _check_key(option: str, key: str, item: str, seen) -> None:
    if not key:
        raise InputError(f"{option} {item!r}: expected key=..., e.g. training.learning_rate=...")
    if key in seen:
        raise InputError(f"{option} {key}: given twice; list all its values in one {option}")
    if key in ("training.output_dir", "training.overwrite_output_dir"):
        raise InputError(f"{option} {key}: the sweep sets it (one subfolder per trial)")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`["training.learning_rate=3e-3,8e-3"]` -> `{"training.learning_rate": [0.003, 0.008]}`: values parsed like
    `--set`, split on commas, or a JSON list (`key=[[1,2],[3]]`). A malformed item is a `ValueError` naming it."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise InputError(f"--grid {item!r}: expected key=v1,v2,..., e.g. training.learning_rate=3e-3,8e-3")
        _check_key("--grid", key, item, grid)
        values = _split_values(text)
        if not values:
            raise InputError(f"--grid {key}: has no values; give at least one, e.g. {key}=v1,v2")
        if len(values) != len(set(map(value_text, values))):
            raise InputError(f"--grid {key}: has duplicate values {values}")
        grid[key] = values
    return grid


def parse_search(items: list[str]) -> list[SearchParam]:
    """`["training.learning_rate=log:1e-4:3e-2"]` -> `[SearchParam("training.learning_rate", "log", 1e-4, 3e-2)]`;
    `SEARCH_HELP` gives the syntax. A malformed item is an `InputError` naming it and the syntax."""
    params: dict[str, SearchParam] = {}
    for item in items:
        key, sep, spec = item.partition("=")
        key = key.strip()
        kind, _, rest = spec.partition(":")
        bad = f"--search {item}: expected {SEARCH_HELP}"
        if not sep or kind not in SEARCH_KINDS or not rest.strip():
            raise InputError(bad)
        _check_key("--search", key, item, params)
        if kind == "choice":
            choices = _split_values(rest)
            if not choices or len(choices) != len(set(map(value_text, choices))):
                raise InputError(f"--search {item}: choices must be given, each once")
            params[key] = SearchParam(key, kind, choices=tuple(choices), text=item)
            continue
        ends = [parse_value(part.strip()) for part in rest.split(":")]
        number = int if kind == "int" else (int, float)
        if len(ends) != 2 or not all(isinstance(v, number) and not isinstance(v, bool) for v in ends):
            raise InputError(bad)
        low, high = ends
        if not low < high:
            raise InputError(f"--search {item}: LOW must be below HIGH")
        if kind == "log" and low <= 0:
            raise InputError(f"--search {item}: a log range needs LOW > 0")
        params[key] = SearchParam(key, kind, low, high, text=item)
    return list(params.values())


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _digest(point: dict[str, Any], index: int | None = None) -> str:
    # Of the redacted values: a hash of a password in a folder name, sweep.json and the study would confirm a guess
    # offline, and a new password would rename the folder. `index`: the point's place in its grid (`point_names`).
    text = json.dumps(redact_urls(point), sort_keys=True, ensure_ascii=False) + ("" if index is None else f"#{index}")
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:8]


def point_name(point: dict[str, Any], digest: str | None = None) -> str:
    """Folder name of a point: `learning_rate=0.003,seed=1`, `target_modules=k+v` (the last part of each key; a list
    joined with `+`), from its values with their URLs' credentials taken out. Characters unsafe in a file name become
    `_`, and then `digest` (a short hash of the values so redacted) is added (`name_or_path=org_model-1a2b3c4d`), so
    that points whose values differ only in those characters (`a b` and `a_b`) never share a folder. See
    [`point_names`] for values that share a text form."""

    def text(value: Any) -> str:
        if isinstance(value, list):
            return "+".join(text(item) for item in value)
        return value if isinstance(value, str) else json.dumps(value)

    name = ",".join(f"{key.rsplit('.', 1)[-1]}={text(redact_urls(value))}" for key, value in point.items())
    safe = re.sub(r"[^\w.=,+-]", "_", name)
    return name if safe == name else f"{safe}-{digest or _digest(point)}"


def point_names(points: list[dict[str, Any]]) -> list[str]:
    """The folder names of a grid's points: [`point_name`], plus the hash where two points would share a name, also
    on a file system that ignores letter case (`["none"]` and `"none"` both read `none`; `Review` and `review` are
    one folder on macOS and Windows). Points whose values differ only in credentials hash alike once redacted: their
    place in the grid, the same on every run of the command, goes into their hash."""
    digests = [_digest(point) for point in points]
    alike = Counter(digests)
    digests = [_digest(point, index) if alike[digest] > 1 else digest for index, (point, digest) in enumerate(
        zip(points, digests, strict=True))]
    names = [point_name(point, digest) for point, digest in zip(points, digests, strict=True)]
    counts = Counter(name.casefold() for name in names)
    return [name if counts[name.casefold()] == 1 else f"{name}-{digest}"
            for name, digest in zip(names, digests, strict=True)]


def base_recipe(recipe, overrides=None, extra_sections: dict[str, type] | None = None) -> Recipe:
    """The recipe every trial starts from: `recipe` with its `--set` overrides, validated."""
    return load_recipe(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides, extra_sections)


def trial_recipe(base: Recipe, values: dict[str, Any], output_dir: str | Path, overwrite: bool = False,
                 extra_sections: dict[str, type] | None = None) -> Recipe:
    """`base` with one trial's values, writing into `output_dir` (and replacing a run there with `overwrite`)."""
    overrides = {**values, "training.output_dir": str(output_dir),
                 **({"training.overwrite_output_dir": True} if overwrite else {})}
    return load_recipe(base.to_dict(), overrides, extra_sections=extra_sections)


def plan_sweep(
    recipe: str | Path | dict | Recipe,
    grid: dict[str, list[Any]],
    overrides: dict | list[str] | None = None,
    extra_sections: dict[str, type] | None = None,
    *,
    overwrite: bool = False,
) -> list[tuple[dict[str, Any], Recipe]]:
    """Validate every grid point; return `(point, recipe)` pairs, each recipe writing into its own subfolder of the
    recipe's `training.output_dir` (and, with `overwrite`, replacing the run there)."""
    base = base_recipe(recipe, overrides, extra_sections)
    root = Path(base.training["output_dir"])
    points = grid_points(grid)
    plan, errors = [], []
    for point, name in zip(points, point_names(points), strict=True):
        try:
            plan.append((point, trial_recipe(base, point, root / name, overwrite, extra_sections)))
        except RecipeError as error:
            # The base recipe and its --set overrides were checked above: a problem here is in a --grid value.
            errors.extend(f"sweep point {name}: --grid{line[len(OVERRIDE):]}" if line.startswith(OVERRIDE + ": ")
                          else f"sweep point {name}: {line}" for line in error.errors)
    if errors:
        raise RecipeError(errors)
    return plan


def check_search(base: Recipe, params: list[SearchParam], extra_sections: dict[str, type] | None = None) -> None:
    """Refuse a range that can produce an invalid recipe: both ends of each range and each choice are validated (the
    other keys at the base recipe's values); one line per problem, naming the --search item."""
    errors = []
    folder = Path(base.training["output_dir"]) / "trial-check"
    for param in params:
        for value in param.choices if param.kind == "choice" else (param.low, param.high):
            try:
                trial_recipe(base, {param.key: value}, folder, extra_sections=extra_sections)
            except RecipeError as error:
                errors.extend(f"--search {param.text}: {line.removeprefix(OVERRIDE + ': ')}" for line in error.errors)
    if errors:
        raise RecipeError(list(dict.fromkeys(errors)))


def check_folders(root: Path, study_name: str, names: dict[str, str], ours: set[Path], overwrite: bool) -> None:
    """Before the first trial: refuse the folders a search trains into (a grid's points, else `trial-*`) that hold
    runs of no trial of the study (`ours`), and a `sweep.json` of another study, unless `overwrite`."""
    ours = {folder.resolve() for folder in ours}
    problems = []
    for folder in [root / name for name in names.values()] or sorted(root.glob("trial-*")):
        try:
            if folder.resolve() not in ours:
                check_fresh(folder, overwrite)
        except FileExistsError as error:
            problems.append(f"sweep trial folder {folder.name}: {error}")
    try:
        studies = ({row["study"] for row in read_json(root / SWEEP_FILE, allow_nan=True)}
                   if (root / SWEEP_FILE).exists() else set())
    except (OSError, ValueError, TypeError, KeyError):
        studies = None
    if not overwrite and (studies is None or not studies <= {study_name}):
        held = "a file that is not a sweep's results" if studies is None else f"the results of study {studies}"
        problems.append(f"training.output_dir: {root / SWEEP_FILE} holds {held}; pass --overwrite to replace it, or "
                        "choose another training.output_dir")
    if problems:
        raise RecipeError(problems)


def default_objective(recipe: Recipe) -> tuple[str, str]:
    """The recipe's main metric and its direction: `training.metric_for_best_model` (with `greater_is_better`, else
    transformers' rule: a loss is minimized) when set, else `eval_label_accuracy` (maximized) when evaluation
    reports it, else `eval_loss`, or `train_loss` without validation data."""
    training = recipe.training
    if training.get("metric_for_best_model"):
        key = training["metric_for_best_model"]
        key = key if key.startswith("eval_") else f"eval_{key}"
        greater = training.get("greater_is_better")
        return key, "maximize" if (not key.endswith("loss") if greater is None else greater) else "minimize"
    if recipe.data.validation_split is None and not recipe.data.validation_size:
        return "train_loss", "minimize"
    if "label_accuracy" in recipe.eval.metrics:
        return "eval_label_accuracy", "maximize"
    return "eval_loss", "minimize"


@dataclass
class SearchPlan:
    """A checked search: base recipe, searched keys (a grid's as choices), each grid point's folder name (by its
    [`value_text`]), trial count, objective, and the `spec` a study records to tell its search from another's."""

    base: Recipe
    params: list[SearchParam]
    names: dict[str, str]
    n_trials: int
    objective: str
    direction: str
    spec: dict


def plan_search(recipe, grid=None, search=None, overrides=None, n_trials: int | None = None,
                objective: str | None = None, direction: str | None = None,
                extra_sections: dict[str, type] | None = None) -> SearchPlan:
    """Parse and check a search (`grid` or `search`, as `--grid`/`--search` texts or parsed) before any trial: every
    grid point, both ends of each range and each choice are validated; see `ia3_trainer.training.search.run_search`."""
    grid = parse_grid(grid) if isinstance(grid, list) else dict(grid or {})
    params = parse_search(search) if search and isinstance(search[0], str) else list(search or [])
    if bool(grid) == bool(params):
        raise InputError("sweep: give either --grid key=v1,v2 (an exact grid) or --search key=KIND:... (a sampled "
                         "search), one of the two; a searched choice is --search key=choice:v1,v2")
    base = base_recipe(recipe, overrides, extra_sections)
    default_key, default_direction = default_objective(base)
    objective = objective or default_key
    direction = direction or (default_direction if objective == default_key else
                              "minimize" if objective.endswith("loss") else "maximize")
    if direction not in ("minimize", "maximize"):
        raise InputError(f"--direction {direction}: expected minimize or maximize")
    names = {}
    if grid:
        points = grid_points(grid)
        plan_sweep(base, grid, extra_sections=extra_sections)  # every point validated
        if n_trials not in (None, len(points)):
            raise InputError(f"--trials {n_trials}: a grid runs each of its {len(points)} points once; leave it out")
        n_trials = len(points)
        names = dict(zip(map(value_text, points), point_names(points), strict=True))
        params = [SearchParam(key, "choice", choices=tuple(values)) for key, values in grid.items()]
    else:
        check_search(base, params, extra_sections)
        n_trials = 20 if n_trials is None else n_trials
    if n_trials < 1:
        raise InputError(f"--trials {n_trials}: must be at least 1")
    if objective.startswith("eval_") and base.data.validation_split is None and not base.data.validation_size:
        raise InputError(f"--objective {objective}: the recipe has no validation data; set data.validation_size > 0 "
                         "or choose train_loss")
    spec = redact_urls({"grid": {key: [value_text(value) for value in values] for key, values in grid.items()},
                        "search": sorted(param.text for param in params if param.text), "objective": objective,
                        "direction": direction})  # what the study stores: URLs without their credentials
    return SearchPlan(base, params, names, n_trials, objective, direction, spec)


def format_table(rows: list[dict[str, Any]], keys: list[str], extra: tuple[str, ...] = ()) -> str:
    """A Markdown table: the searched keys, then the loss and every eval metric (no timings), then `extra` columns."""
    metrics = [key for key in dict.fromkeys(k for row in rows for k in row) if (key == "train_loss" or key.startswith(
        "eval_")) and not key.endswith(("_runtime", "_per_second", "_flos"))]
    columns = [*keys, *metrics, *extra]
    header = [key.rsplit(".", 1)[-1] if key in keys else key for key in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """`rows` as CSV, one column per key of any row, written whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)
    return write_text(path, buffer.getvalue())


def study_rows(study, params: list[SearchParam], order: list[str] = ()) -> list[dict[str, Any]]:
    """One row per trial, by number (a grid's in the `order` of its point keys): its values (dotted keys),
    `output_dir`, its metrics, then `trial`, `state` (COMPLETE, PRUNED, FAIL, RUNNING, WAITING), `objective` (a
    pruned trial's last reported value), `study`, `host` (the machine that holds the folder) and any `error`."""
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.user_attrs.get("surplus"):
            continue
        values = {p.key: p.choices[trial.params[p.key]] if p.kind == "choice" else trial.params[p.key]
                  for p in params if p.key in trial.params}  # a choice by its index (`search.sample`)
        objective = trial.value if trial.values else (
            trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
        row = {**values, "output_dir": trial.user_attrs.get("folder"), **trial.user_attrs.get("metrics", {}),
               "trial": trial.number, "state": trial.state.name, "objective": objective, "study": study.study_name,
               "host": (trial.user_attrs.get("worker") or {}).get("host")}
        if "error" in trial.user_attrs:
            row["error"] = trial.user_attrs["error"]
        rows.append(row)
    place = {key: index for index, key in enumerate(order)}
    return sorted(rows, key=lambda row: place.get(value_text({p.key: row.get(p.key) for p in params}), len(place)))


def summary_text(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """What `ia3-trainer sweep` prints: the table and the best trial's adapter folder."""
    text = format_table(rows, keys, extra=("state", "output_dir"))
    best = next((row for row in rows if row.get("best")), None)
    if best is not None:
        where = "" if best["host"] in (None, socket.gethostname()) else f" on {best['host']}"
        text += f"\nbest: trial {best['trial']} (objective {best['objective']:.4g}), adapter in {best['output_dir']}"
        text += where
    return text


def write_results(rows: list[dict[str, Any]], root: Path, params: list[SearchParam], objective: str,
                  plot: bool = True) -> list[Path]:
    """`sweep.json` (the rows, strict JSON), `results.csv` and, with `plot` and searched ranges, `search.png`."""
    from ia3_trainer.evaluation.report import plot_objective

    rows = redact_urls(json.loads(json.dumps(rows, default=str)))  # a grid over data URLs: no credential on disk
    paths = [write_json(root / SWEEP_FILE, finite(rows)), write_csv(rows, root / RESULTS_CSV)]
    picture = plot_objective(rows, params, objective, root / PLOT_FILE) if plot and params and rows else None
    return paths + [picture] * (picture is not None)
