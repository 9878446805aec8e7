"""One-off: move the flat `ia3_trainer/*.py` modules into subpackages that show the layers (issue #17).

Run from the repository root on a clean, committed tree (every branch merged), then check and commit:

    python scripts/relayout.py --check   # plans only: lists what stops it (an unmapped module or name)
    python scripts/relayout.py
    ruff check ia3_trainer tests benchmarks examples scripts && lint-imports --no-cache
    python -m pytest tests/test_layers.py tests/test_recipe.py tests/test_cli.py tests/test_data.py -x -q
    pip install -e . --no-deps   # the console script is now ia3_trainer.cli.main:main
    git rm -q scripts/relayout.py && git add -A && git commit -m "Subpackages by layer"

What it does, in order (it stops before changing anything, with a list, when a module is in neither `MOVES` nor
`SPLITS`, or a top-level name of a split module has no home):
1. `git mv` each module to its subpackage (history follows); `cli.py` + `commands.py` (one module per command) and
   `data.py` (splits, labels, encoding, preparation) are split by top-level name (`SPLITS`; a helper not named there
   goes with the one new module that uses it; a private name used across new modules is made public).
2. Rewrites every intra-package import to an absolute `from ia3_trainer.<package>.<module> import ...`, and every
   `ia3_trainer.<module>` reference (imports, `monkeypatch` targets, logger names, docstrings, file paths) in the
   package, tests/, benchmarks/, examples/, scripts/, docs/, README.md, CONTRIBUTING.md and mkdocs.yml; rewraps
   docstring and comment lines that a longer path made too long.
3. Writes each subpackage's `__init__.py` (what it owns, what it may import), `.importlinter` (the layer contract),
   and the package list and console script in pyproject.toml; sorts imports (`ruff check --fix --select I`).
It prints what it cannot do itself (e.g. a test that monkeypatches a private name that moved): fix those by hand.
Delete this script after use.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path


PACKAGE = "ia3_trainer"
NEW = "IA3_TRAINER_NEW"  # stands for the package in paths already rewritten, until the end
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / PACKAGE

# Modules that stay at the top: the base layer every other one may import, and the package's entry points.
TOP = {"__init__", "__main__", "errors", "jsonfiles", "layout", "network"}

# Subpackages from the highest layer to the lowest; each may import only the ones below it (and the top modules).
# Layers on one line (a tuple) may not import each other.
LAYERS = ["cli", "training", ("inference", "hub"), "evaluation", "modeling", "data", "recipe"]

PACKAGES = {
    "recipe": (
        "The recipe: its schema mechanics, the section dataclasses (the one registry of sections), loading a recipe "
        "by name or path with `--set` overrides, the output-folder rules, the shipped recipes, and the training "
        "arguments a recipe builds.",
        "May import only the top modules (`errors`, `jsonfiles`, `layout`, `network`).",
    ),
    "data": (
        "Data: reading sources (local files, Hub datasets), splits, columns and labels, encoding examples (the one "
        "`encode` used by training and inference), the padding collator, the starter recipe read from a data file, "
        "and the data fingerprint a run records.",
        "May import `ia3_trainer.recipe` and the top modules.",
    ),
    "modeling": (
        "Models: loading the tokenizer and base model with their fixes, IA3 targets per architecture, the IA3 layer "
        "forward (mixed-adapter batches), fused kernels, the scoring kernel every evaluation runs (token losses, "
        "rank classification, bounded generation), and CPU thread settings.",
        "May import `ia3_trainer.data`, `ia3_trainer.recipe` and the top modules.",
    ),
    "evaluation": (
        "Evaluation: metric functions (pure numpy; the one registry of metrics), the trainer's evaluation loop on top "
        "of the scoring kernel, and the evaluation report with its plots.",
        "May import `ia3_trainer.modeling`, `ia3_trainer.data`, `ia3_trainer.recipe` and the top modules.",
    ),
    "inference": (
        "Using a trained adapter: reading an adapter folder or Hub repo, `IA3Predictor` (mixed batches), and "
        "`merge_adapter`.",
        "May import `ia3_trainer.evaluation` and every layer below it, never `ia3_trainer.hub`, `training` or "
        "`cli`.",
    ),
    "hub": (
        "The Hugging Face Hub: uploading an adapter folder (allow-list, redaction, timeouts), the push callback, and "
        "the model card.",
        "May import `ia3_trainer.evaluation` and every layer below it, never `ia3_trainer.inference`, `training` or "
        "`cli`.",
    ),
    "training": (
        "Training: `IA3Seq2SeqTrainer`, the run lifecycle (claim the folder, train, evaluate, write results and "
        "report, wait for pushes), the non-finite-loss guard, atomic checkpoints, the run folder lock and resume "
        "checks, saving, and sweeps and searches over recipes.",
        "May import `ia3_trainer.hub`, `ia3_trainer.inference` and every layer below them, never `ia3_trainer.cli`.",
    ),
    "cli": (
        "The command line `ia3-trainer`: `main` parses the arguments, runs one command module and formats the "
        "package's errors as one line; each other module here is one command.",
        "May import every other part of the package; nothing imports it.",
    ),
}

# Flat module -> "package.module". A module missing from the tree is skipped; a module in the tree missing here
# stops the script. Names known to be coming from other branches are listed too.
MOVES = {
    "schema": "recipe.schema",
    "sections": "recipe.sections",
    "recipe": "recipe.loading",
    "overrides": "recipe.overrides",
    "output_dir": "recipe.output_dir",
    "shipped": "recipe.shipped",
    "training_args": "recipe.training_args",
    "sources": "data.sources",
    "starter": "data.starter",
    "fingerprint": "data.fingerprint",
    "modeling": "modeling.loading",
    "architectures": "modeling.architectures",
    "layers": "modeling.layers",
    "kernels": "modeling.kernels",
    "scoring": "modeling.scoring",
    "threads": "modeling.threads",
    "metrics": "evaluation.metrics",
    "evaluation": "evaluation.loop",
    "report": "evaluation.report",
    "adapters": "inference.adapters",
    "predictor": "inference.predictor",
    "merging": "inference.merging",
    "upload": "hub.upload",
    "hub": "hub.callback",
    "model_card": "hub.model_card",
    "trainer": "training.trainer",
    "lifecycle": "training.lifecycle",
    "guard": "training.guard",
    "checkpoints": "training.checkpoints",
    "runs": "training.runs",
    "run_record": "training.run_record",
    "resuming": "training.resuming",
    "saving": "training.saving",
    "sweep": "training.sweep",
    "search": "training.search",
    "search_report": "training.search_report",
}

# Modules split by top-level name into several: {flat module: {new module: [names]}}. A top-level name not listed
# goes with the one new module whose code uses it; one used by several, or by none, stops the script.
SPLITS = {
    "cli": {
        "cli.main": ["_Parser", "build_parser", "main", "_run", "_QUICK_COMMANDS", "_progress_bars_on_terminals_only",
                     "_close_progress_bars", "_interrupted", "_add_adapter_commands", "_ADAPTER_COMMANDS",
                     "__main__"],
        "cli.train": ["_train", "_TrainingDone", "_claim_output_dir", "_summary", "_report_summary",
                      "_wait_for_pushes"],
        "cli.listing": ["_list", "_list_architectures"],
        "cli.sweep": ["_sweep"],
        "cli.push": ["_push"],
        "cli.merge": ["_merge"],
    },
    "commands": {
        "cli.init": ["init"],
        "cli.adapters": ["_check_counts", "announce_remote_code", "load_predictor"],
        "cli.predict": ["predict", "_check_output_file", "_read_text_file"],
        "cli.evaluate": ["evaluate", "_check_report_folder", "_file_data"],
    },
    "data": {
        "data.splits": ["FILE_FORMATS", "data_file_format", "load_splits", "_load_splits", "split_lines",
                        "check_columns"],
        "data.labels": ["label_texts", "is_classification", "check_label_lengths", "truncated_target_lengths",
                        "target_length_bound", "longest_labels"],
        "data.encoding": ["IGNORE_INDEX", "encode_batch", "tokenize", "cut_sources", "warn_truncated_sources",
                          "build_collator"],
        "data.preparation": ["PreparedData", "prepare_data", "warn_shared_texts"],
    },
}
# Modules split together: a name of one may be used by the others (the CLI's `main` dispatches to `commands`).
FAMILIES = [("cli", "commands"), ("data",)]
DUPLICATE = {"logger"}  # copied into each new module that uses it
# A private name used by another new module is made public: by this table, else by dropping the underscore.
RENAMES = {
    "_train": "train_command", "_claim_output_dir": "claim_train_folder", "_sweep": "sweep_command",
    "_push": "push_command", "_merge": "merge_command", "_list": "list_command",
    "_list_architectures": "list_architectures_command",
    "init": "init_command", "predict": "predict_command", "evaluate": "evaluate_command",
}
DOCSTRINGS = {
    "cli.train": "`ia3-trainer train`: run a recipe's training through the run lifecycle and print what it wrote.",
    "cli.listing": "`ia3-trainer list` and `ia3-trainer list-architectures`.",
    "cli.sweep": "`ia3-trainer sweep`: train a recipe at every point of a grid or a search, and print the table.",
    "cli.push": "`ia3-trainer push`: push a finished run's adapter to the Hugging Face Hub; the folder is only read.",
    "cli.merge": "`ia3-trainer merge`: fold an adapter into its base model and save a plain transformers model.",
    "cli.adapters": "What `predict`, `evaluate` and `merge` share: checking their counts, and loading the adapter "
                    "named on the command line, saying first whose code `--trust-remote-code` lets run.",
    "cli.init": "`ia3-trainer init`: write a starter recipe for a local data file and say what to check.",
    "cli.predict": "`ia3-trainer predict`: label texts with a trained adapter; arguments and files are checked before "
                   "any model loads.",
    "cli.evaluate": "`ia3-trainer evaluate`: score an adapter on its recipe's validation split or a file, and write "
                    "the report.",
    "data.splits": "The recipe's splits: reading its data (a local file of any supported format, or a Hub dataset), "
                   "holding out the validation split, and checking the columns.",
    "data.labels": "Labels: the label texts and the label set, and the generation bound taken from the longest "
                   "label; every problem names the `data.*` field to change.",
    "data.encoding": "Encoding examples: the one `encode_batch` used by training and inference, tokenizing a split, "
                     "counting truncated sources, and the padding collator.",
    "data.preparation": "`prepare_data`: the recipe's data made ready to train on (splits, labels, tokens), with "
                        "warnings about texts shared by both splits.",
}
# Text replaced in a flat module before it is split (a dispatch by module attribute becomes explicit names).
BEFORE_SPLIT = {
    "cli": [(
        re.compile(r"from \. import commands\n\n?(\s+)return getattr\(commands, args\.command\)\(args\)"),
        r'command = {"init": init, "predict": predict, "evaluate": evaluate}[args.command]\n\1return command(args)',
    )],
}
# Known lines outside the package that name a split module's private names: (regex, replacement), applied where
# found, else skipped.
TEXT_FIXES = {
    "tests/test_cli.py": [
        # `from ia3_trainer import cli[, errors]` whose `cli._train` is patched: main() calls `train_command` now.
        (r"^( *)from ia3_trainer import cli, (\w+)\n", rf"\1import {NEW}.cli.main as cli\n\1from {NEW} import \2\n"),
        (r"^( *)from ia3_trainer import cli\n", rf"\1import {NEW}.cli.main as cli\n"),
        (r'monkeypatch\.setattr\(cli, "_train", ', 'monkeypatch.setattr(cli, "train_command", '),
    ],
    # Its check of private names read `from . import __version__` as a module; absolute, it is a name.
    "tests/test_recipe.py": [
        (r'( +)elif alias\.name\.startswith\("_"\):\n',
         r'\1elif alias.name.startswith("_") and not alias.name.startswith("__"):\n'),
    ],
}
CONSOLE_SCRIPT = "ia3_trainer.cli.main:main"
# Files outside the package whose `ia3_trainer.<module>` references are rewritten.
OUTSIDE = ["tests/**/*.py", "benchmarks/**/*.py", "examples/**/*.py", "examples/**/*.md", "scripts/**/*.py",
           "docs/**/*.md", "docs/**/*.yml", "docs/**/*.py", "README.md", "CONTRIBUTING.md", "mkdocs.yml", ".ci/*"]

OUTSIDE_CODE = ("tests", "benchmarks", "examples", "scripts")
problems: list[str] = []  # what stops the script
notes: list[str] = []  # what the lead fixes by hand afterwards


def git(*args: str) -> None:
    subprocess.run(["git", *args], cwd=ROOT, check=True)


# --- planning --------------------------------------------------------------------------------------------------------


def flat_modules() -> list[str]:
    return sorted(path.stem for path in SRC.glob("*.py"))


def plan() -> dict[str, str]:
    """Flat module -> new dotted module (relative to the package) for every moved module."""
    if any((SRC / name).is_dir() for name in PACKAGES):
        sys.exit(f"relayout: {SRC} has subpackages already; run this on the flat layout only")
    present = flat_modules()
    this = Path(__file__).resolve()
    for path in [*SRC.glob("*.py"), *(p for d in OUTSIDE_CODE for p in ROOT.glob(f"{d}/**/*.py"))]:
        if path.resolve() == this:
            continue
        try:
            ast.parse(path.read_text())
        except SyntaxError as error:
            problems.append(f"{path.relative_to(ROOT)}:{error.lineno}: does not parse ({error.msg}); fix it first")
    unknown = [name for name in present if name not in TOP and name not in MOVES and name not in SPLITS]
    if unknown:
        problems.append("modules not in MOVES or SPLITS (add each to scripts/relayout.py): "
                        + ", ".join(f"ia3_trainer/{name}.py" for name in unknown))
    check_imported_names()
    return {name: new for name, new in MOVES.items() if name in present}


def check_imported_names() -> None:
    """Every `from .x import y` in the package names something `x` binds at its top level: a merge that kept an import
    of a name that moved (the run folder's file names are in `layout`) is found here, before anything moves."""
    bound: dict[str, set[str]] = {}
    trees = {}
    for path in SRC.glob("*.py"):
        try:
            trees[path.stem] = tree = ast.parse(path.read_text())
        except SyntaxError:
            continue  # reported above
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node in tree.body:
                names.add(node.name)
        for node in tree.body:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store) and not isinstance(
                        node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(sub.id)
                elif isinstance(sub, ast.alias) and isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)):
                    names.add((sub.asname or sub.name).split(".")[0])
        bound[path.stem] = names | {"__version__"} if path.stem == "__init__" else names
    for stem, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in bound:
                missing = [a.name for a in node.names if a.name not in bound[node.module] and a.name != "*"]
                if missing:
                    problems.append(f"ia3_trainer/{stem}.py:{node.lineno}: imports {', '.join(missing)} from "
                                    f".{node.module}, which does not define it (moved elsewhere?)")


# --- splitting a module by top-level name ----------------------------------------------------------------------------


def top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
        return ["__main__"]
    return []


def used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def bound_names(tree: ast.AST) -> set[str]:
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.alias):
            names.add((n.asname or n.name).split(".")[0])
    return names


def split_sources() -> tuple[dict[str, str], dict[str, dict[str, list]], dict[str, str]]:
    """Plan the modules of SPLITS: (top-level name -> new module, new module -> its header, body and names, renames).

    Names are resolved within a family (modules split together, which may use each other's names); a name in
    DUPLICATE (`logger`) is copied into each new module that uses it, under the flat module's logger name, so log
    filters and tests that name `ia3_trainer.data` keep working."""
    owner: dict[str, str] = {}
    parts: dict[str, dict[str, list]] = {}
    renames: dict[str, str] = {}
    defined: dict[str, str] = {}  # name -> flat module, across families (names must be unique)
    for family in FAMILIES:
        segments: dict[str, tuple[str, ast.stmt, str]] = {}  # name -> (flat module, node, source text)
        for flat in family:
            targets = SPLITS[flat]
            path = SRC / f"{flat}.py"
            if not path.is_file():
                continue
            text = path.read_text()
            for pattern, replacement in BEFORE_SPLIT.get(flat, []):
                text = pattern.sub(replacement, text)
            lines = text.splitlines(keepends=True)
            tree = ast.parse(text)
            header = [node for node in tree.body
                      if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0]
            header_text = "".join("".join(lines[n.lineno - 1:n.end_lineno]) for n in header)
            for target in targets:
                parts.setdefault(target, {"header": [], "body": [], "names": []})["header"].append(header_text)
            for name, target in ((n, t) for t, names in targets.items() for n in names):
                owner[name] = target
            for node in tree.body:
                if node in header or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
                    continue
                names = top_level_names(node)
                if not names:
                    problems.append(f"{path.name}:{node.lineno}: a top-level statement that is no def, class or "
                                    "assignment; move it by hand")
                    continue
                first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
                while (first > 1 and lines[first - 2].lstrip().startswith("#")
                       and not lines[first - 2].startswith("# ---")):
                    first -= 1  # comment lines right above belong to the definition
                for name in names:
                    if name in defined and defined[name] != flat and name not in DUPLICATE:
                        problems.append(f"{flat}.py and {defined[name]}.py both define {name!r}; rename one")
                    defined[name] = flat
                    segments[name] = (flat, node, "".join(lines[first - 1:node.end_lineno]))
        copies = {name: segments.pop(name) for name in DUPLICATE if name in segments}
        # Names not listed follow the one new module that uses them.
        pending = [name for name in segments if name not in owner]
        while pending:
            progress = False
            for name in list(pending):
                users = {owner[other] for other, (_, node, _) in segments.items()
                         if other in owner and other != name and name in used_names(node)}
                if len(users) == 1:
                    owner[name] = users.pop()
                    pending.remove(name)
                    progress = True
            if not progress:
                break
        for name in pending:
            flat = segments[name][0]
            users = sorted({owner[o] for o, (_, n, _) in segments.items() if o in owner and name in used_names(n)})
            problems.append(f"{flat}.py: top-level name {name!r} is not in SPLITS and is used by "
                            f"{', '.join(users) or 'no other definition'}: add it to SPLITS[{flat!r}]")
        for flat in family:
            for name in [n for names in SPLITS[flat].values() for n in names]:
                if name not in segments and (SRC / f"{flat}.py").is_file():
                    notes.append(f"SPLITS[{flat!r}] names {name!r}, which is no longer defined; nothing to move")
        # Which names cross modules: they are imported, and made public when private.
        imports: dict[str, set[str]] = {}
        for name, (_, node, _) in segments.items():
            if name not in owner:
                continue
            for used in used_names(node) & set(segments):
                if used in owner and owner[used] != owner[name]:
                    imports.setdefault(owner[name], set()).add(used)
                    if used.startswith("_") or used in RENAMES:
                        renames[used] = RENAMES.get(used, used.lstrip("_"))
        for name, (_, _node, text) in sorted(segments.items(), key=lambda item: item[1][1].lineno):
            if name in owner and text not in parts[owner[name]]["body"]:
                parts[owner[name]]["body"].append(text)
                parts[owner[name]]["names"].append(name)
        for name, (flat, _node, text) in copies.items():  # `logger = logging.getLogger(__name__)` where it is used
            text = text.replace("__name__", f'"{PACKAGE}.{flat}"')
            for target in {owner[o] for o, (_, n, _) in segments.items() if o in owner and name in used_names(n)}:
                parts[target]["body"].insert(0, text)
        for target, used in imports.items():
            for name in sorted(used):
                if owner[name] == "cli.main" and target != "cli.main":
                    problems.append(f"{target} would import {name!r} from cli.main (a cycle): move {name!r} to the "
                                    "command module that needs it, or to a new one, in SPLITS")
                parts[target]["header"].append(f"from {NEW}.{owner[name]} import {renames.get(name, name)}\n")
        graph = {target: {owner[name] for name in used} for target, used in imports.items()}
        for target in graph:
            seen, stack = set(), list(graph[target])
            while stack:
                other = stack.pop()
                if other == target:
                    problems.append(f"{target} would import itself through {sorted(graph[target])}: change SPLITS")
                    break
                if other not in seen:
                    seen.add(other)
                    stack.extend(graph.get(other, ()))
    for old, new in renames.items():
        for target, part in parts.items():
            text = "".join(part["body"])
            if re.search(rf"(?<![\w.]){re.escape(new)}\b", text) and new != old:
                problems.append(f"renaming {old!r} to {new!r} clashes with a name {new!r} already in {target}: set "
                                "another in RENAMES")
    return owner, parts, renames


def rename_text(text: str, renames: dict[str, str]) -> str:
    """Rename the module-level names in `renames` where they are used as such: a local variable of the same name in a
    function (`init = commands.add_parser("init")`) keeps its name."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits = []  # (line, column, old, new)

    def local_names(function) -> set[str]:
        names = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
        return names

    def visit(node, local: set[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in renames:
            if not local:  # a top-level definition
                line = lines[node.lineno - 1]
                column = line.index(node.name, node.col_offset)
                edits.append((node.lineno, column, node.name, renames[node.name]))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local = local | local_names(node) | {"<function>"}
        if isinstance(node, ast.Name) and node.id in renames and node.id not in local:
            edits.append((node.lineno, node.col_offset, node.id, renames[node.id]))
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    for node in tree.body:
        if isinstance(node, ast.Assign):  # a module-level assignment binds its targets at the top, not locally
            for target in node.targets:
                visit(target, set())
            visit(node.value, set())
        else:
            visit(node, set())
    for number, column, old, new in sorted(edits, reverse=True):
        line = lines[number - 1]
        assert line[column:column + len(old)] == old, (line, old)
        lines[number - 1] = line[:column] + new + line[column + len(old):]
    return "".join(lines)


# --- rewriting references --------------------------------------------------------------------------------------------


def resolve(flat: str, attr: str | None, owner: dict[str, str], moves: dict[str, str]) -> tuple[str, str | None]:
    """The new dotted module for `ia3_trainer.<flat>[.<attr>]`, and the attribute name there."""
    if flat in moves:
        return moves[flat], attr
    if flat in SPLITS:
        if attr and attr in owner:
            return owner[attr], attr
        return "", attr
    return flat, attr


def rewrite_imports(text: str, module: str, owner: dict[str, str], moves: dict[str, str],
                    renames: dict[str, str], where: str) -> str:
    """Relative imports in the package become absolute ones to the new modules; names of split modules are imported
    from the module that now defines them."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and not (node.module or "").startswith(PACKAGE):
            continue
        if node.level > 1:
            problems.append(f"{where}:{node.lineno}: `from {'.' * node.level}...` import; rewrite it by hand")
            continue
        if node.level == 1:
            flat = node.module  # in the flat layout `.x` is `ia3_trainer.x`
        else:
            rest = node.module[len(PACKAGE):].lstrip(".")
            if "." in rest:
                continue  # already a new path
            flat = rest or None
        indent = " " * node.col_offset
        statements = []
        if flat is None:  # from . import x, y
            for alias in node.names:
                name = alias.name
                if name in moves:
                    package, leaf = moves[name].rsplit(".", 1)
                    bound = alias.asname or name
                    statements.append(f"from {NEW}.{package} import {leaf}"
                                      + (f" as {bound}" if bound != leaf else ""))
                elif name in SPLITS:
                    problems.append(f"{where}:{node.lineno}: `from . import {name}` of a split module; name what "
                                    "it uses instead")
                else:
                    statements.append(f"from {NEW} import {name}" + (f" as {alias.asname}" if alias.asname else ""))
        else:
            groups: dict[str, list[str]] = {}
            for alias in node.names:
                new_module, _ = resolve(flat, alias.name, owner, moves)
                if not new_module:
                    problems.append(f"{where}:{node.lineno}: {flat}.{alias.name} is not defined in any split module")
                    continue
                name = renames.get(alias.name, alias.name) if flat in SPLITS else alias.name
                bound = alias.asname or alias.name  # `x as x` (a re-export) is kept as written
                groups.setdefault(new_module, []).append(name + (f" as {bound}" if alias.asname or bound != name
                                                                 else ""))
            for new_module, names in groups.items():
                statements.append(f"from {NEW}.{new_module} import {', '.join(names)}")
        edits.append((node.lineno, node.end_lineno, "".join(f"{indent}{s}\n" for s in statements)))
    for start, end, new in sorted(edits, reverse=True):
        lines[start - 1:end] = [new]
    return "".join(lines)


PATH_REFERENCE = re.compile(rf"\b{PACKAGE}/([a-z_][a-z0-9_]*)\.py\b")
REFERENCE = re.compile(rf"\b{PACKAGE}\.([a-z_][a-z0-9_]*)(?:\.([A-Za-z_]\w*))?")


def rewrite_references(text: str, owner: dict[str, str], moves: dict[str, str], renames: dict[str, str],
                       where: str) -> str:
    """`ia3_trainer.<flat>[.<attr>]` anywhere in the text (imports, strings, docs) -> the new dotted path."""

    def replace(match: re.Match) -> str:
        flat, attr = match.group(1), match.group(2)
        if flat not in moves and flat not in SPLITS:
            return match.group(0)
        if flat in SPLITS:
            if attr and attr in owner:
                return f"{PACKAGE}.{owner[attr]}.{renames.get(attr, attr)}"
            if flat in PACKAGES and not attr:
                return match.group(0)  # now the package: `python -m ia3_trainer.cli`, a logger name, prose
            line = text.count("\n", 0, match.start()) + 1
            notes.append(f"{where}:{line}: `{match.group(0)}` names a split module; point it at the new one by hand")
            return match.group(0)
        return f"{PACKAGE}.{moves[flat]}" + (f".{attr}" if attr else "")

    def replace_path(match: re.Match) -> str:  # `ia3_trainer/architectures.py` in prose
        flat = match.group(1)
        if flat in moves:
            return f"{PACKAGE}/{moves[flat].replace('.', '/')}.py"
        if flat in SPLITS:
            return f"{PACKAGE}/{next(iter(SPLITS[flat])).split('.')[0]}/"
        return match.group(0)

    return PATH_REFERENCE.sub(replace_path, REFERENCE.sub(replace, text))


def rewrite_from_imports_outside(text: str, owner: dict[str, str], renames: dict[str, str], moves: dict[str, str],
                                 where: str) -> str:
    """`from ia3_trainer.cli import main` -> `from ia3_trainer.cli.main import main`, per name, outside the package;
    `from ia3_trainer import cli` (a module of a split one) is left with a note."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    lines = text.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            flat = node.module[len(PACKAGE) + 1:] if node.module.startswith(PACKAGE + ".") else None
            if flat in SPLITS:
                groups: dict[str, list[str]] = {}
                for alias in node.names:
                    if alias.name not in owner:
                        problems.append(f"{where}:{node.lineno}: {node.module}.{alias.name} is in no split module")
                        continue
                    name = renames.get(alias.name, alias.name)
                    bound = alias.asname or alias.name
                    groups.setdefault(owner[alias.name], []).append(name + (f" as {bound}" if bound != name else ""))
                indent = " " * node.col_offset
                new = "".join(f"{indent}from {NEW}.{module} import {', '.join(names)}\n"
                              for module, names in groups.items())
                edits.append((node.lineno, node.end_lineno, new))
            elif node.module == PACKAGE and any(alias.name in SPLITS or alias.name in moves for alias in node.names):
                # from ia3_trainer import predictor as predictor_module, RecipeError
                kept, statements = [], []
                for alias in node.names:
                    if alias.name in moves:
                        package, leaf = moves[alias.name].rsplit(".", 1)
                        bound = alias.asname or alias.name
                        statements.append(f"from {NEW}.{package} import {leaf}" + (f" as {bound}" if bound != leaf
                                                                                   else ""))
                    else:
                        if alias.name in SPLITS:
                            notes.append(f"{where}:{node.lineno}: imports the split module {alias.name}; its "
                                         "attributes moved to " + ", ".join(sorted(SPLITS[alias.name])))
                        kept.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
                if kept:
                    statements.insert(0, f"from {NEW} import {', '.join(kept)}")
                indent = " " * node.col_offset
                edits.append((node.lineno, node.end_lineno, "".join(f"{indent}{s}\n" for s in statements)))
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.removeprefix(PACKAGE + ".") in SPLITS and alias.name != PACKAGE + ".cli":
                    notes.append(f"{where}:{node.lineno}: imports the split module {alias.name}; fix by hand")
    for start, end, new in sorted(edits, reverse=True):
        lines[start - 1:end] = [new]
    text = "".join(lines)
    for old, new in renames.items():  # monkeypatch.setattr(cli, "_train", ...) and the like
        if not old.startswith("_"):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(rf"[\"']{re.escape(old)}[\"']", line):
                notes.append(f"{where}:{number}: mentions {old!r}, now {new!r} in "
                             f"{PACKAGE}.{owner.get(old, '?')}: check it")
    return text


def deeper_file_paths(text: str, where: str) -> str:
    """A module one folder deeper finds the package's data (templates/, recipes/) one `.parent` further up."""
    text = re.sub(r"Path\(__file__\)(\.resolve\(\))?\.parent\b(?!s)", r"Path(__file__)\1.parents[1]", text)
    if re.search(r"os\.path\.dirname\(__file__\)|__file__\)\.parents\[(?!1\])", text):
        problems.append(f"{where}: finds files relative to __file__ in a way this script does not rewrite")
    return text


# --- writing ---------------------------------------------------------------------------------------------------------


def package_init(name: str) -> str:
    owns, may_import = (text.replace(f"{PACKAGE}.", f"{NEW}.") for text in PACKAGES[name])  # already new paths
    lines = [f'"""{owns}', "", f"{may_import}", '"""', ""]
    return "\n".join(wrap(line, 116) for line in lines)


def wrap(text: str, width: int = 116) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) if text else ""


def importlinter() -> str:
    layers = []
    for layer in LAYERS:
        names = layer if isinstance(layer, tuple) else (layer,)
        layers.append("    " + " | ".join(f"{PACKAGE}.{n}" for n in names))
    top = sorted(TOP - {"__init__", "__main__"})
    base = " : ".join(f"{PACKAGE}.{n}" for n in top)
    return (
        "# The layers of ia3_trainer (checked by `lint-imports`, and by tests/test_layers.py). Each may import\n"
        "# only the layers below it; `a | b` on one line may not import each other (`a : b` may). The top modules\n"
        "# (errors, jsonfiles, layout, network) are the lowest layer. Imports of the package itself (`from\n"
        "# ia3_trainer import __version__`) are left out: its __init__ is the facade that re-exports every layer.\n"
        "[importlinter]\n"
        f"root_package = {PACKAGE}\n"
        "include_external_packages = False\n\n"
        "[importlinter:contract:layers]\n"
        "name = Layers point down: cli > training > inference | hub > evaluation > modeling > data > recipe > base\n"
        "type = layers\n"
        "exhaustive = false\n"
        "layers =\n" + "\n".join(layers) + "\n"
        f"    {base}\n"
        "ignore_imports =\n"
        f"    {PACKAGE}.** -> {PACKAGE}\n\n"
        "[importlinter:contract:base]\n"
        "name = The top modules import no other part of the package\n"
        "type = forbidden\n"
        "source_modules =\n" + "".join(f"    {PACKAGE}.{n}\n" for n in top) +
        "forbidden_modules =\n" + "".join(f"    {PACKAGE}.{n}\n" for n in PACKAGES) +
        "ignore_imports =\n"
        f"    {PACKAGE}.** -> {PACKAGE}\n"
    )


def update_pyproject(subpackages: list[str]) -> None:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    packages = [PACKAGE, *(f"{PACKAGE}.{name}" for name in subpackages), f"{PACKAGE}.recipes", f"{PACKAGE}.templates"]
    new, count = re.subn(r"^packages = \[.*?\]$", "packages = [\n" + "".join(f'    "{p}",\n' for p in packages) + "]",
                         text, flags=re.M | re.S)
    if count != 1:
        problems.append("pyproject.toml: no `packages = [...]` line under [tool.setuptools] to update")
    new, count = re.subn(r'^ia3-trainer = "ia3_trainer\.cli:main"$', f'ia3-trainer = "{CONSOLE_SCRIPT}"', new,
                         flags=re.M)
    if count != 1:
        notes.append(f"pyproject.toml: console script not updated; it must be {CONSOLE_SCRIPT}")
    path.write_text(new)


def main() -> int:
    try:
        return relayout()
    except Exception:
        print("relayout: failed half way; put the tree back with `git reset -q --hard && git clean -qfd ia3_trainer`, "
              "then fix the cause (below) and run it again", file=sys.stderr)
        raise


def relayout() -> int:
    moves = plan()
    owner, parts, renames = split_sources()
    if problems:
        print("relayout: nothing changed; fix these first:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    if "--check" in sys.argv[1:]:
        print(f"relayout --check: ready to move {len(moves)} modules and split {', '.join(SPLITS)}; nothing changed")
        return 0
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    if status.strip():
        print("relayout: commit or stash your changes first:\n" + status, file=sys.stderr)
        return 1

    # 1. Moves, with history.
    subpackages = sorted({new.split(".")[0] for new in [*moves.values(), *owner.values()]})
    for name in subpackages:
        (SRC / name).mkdir()
        (SRC / name / "__init__.py").write_text(package_init(name))
    for flat, new in moves.items():
        git("mv", f"{PACKAGE}/{flat}.py", f"{PACKAGE}/{new.replace('.', '/')}.py")
    # Split modules: the biggest part keeps the file's history (git mv), the others are new files.
    for flat, targets in SPLITS.items():
        if not (SRC / f"{flat}.py").is_file():
            continue
        keeper = max(targets, key=lambda t: sum(map(len, parts[t]["body"])) if t in parts else 0)
        git("mv", f"{PACKAGE}/{flat}.py", f"{PACKAGE}/{keeper.replace('.', '/')}.py")
    original_docs = {}
    for flat in SPLITS:
        source = subprocess.run(["git", "show", f"HEAD:{PACKAGE}/{flat}.py"], cwd=ROOT, capture_output=True,
                                text=True).stdout
        if source:
            original_docs[flat] = ast.get_docstring(ast.parse(source), clean=False)
    for target, part in parts.items():
        if not part["body"]:
            continue
        doc = DOCSTRINGS.get(target) or original_docs.get(next(f for f in SPLITS if target in SPLITS[f]), "")
        header = "".join(dict.fromkeys("".join(part["header"]).splitlines(keepends=True)))
        body = "\n\n".join(segment.rstrip("\n") + "\n" for segment in part["body"])
        text = f'"""{wrap_doc(doc)}"""\n\n{header}\n\n{rename_text(body, renames)}'
        path = SRC / f"{target.replace('.', '/')}.py"
        path.write_text(text)
        if target == "cli.main" and "__main__" in part["names"]:
            (SRC / "cli" / "__main__.py").write_text(
                '"""`python -m ia3_trainer.cli` runs the CLI."""\n\nimport sys\n\n'
                f"from {NEW}.cli.main import main\n\n\nsys.exit(main())\n")
    # 2. References.
    for path in sorted(SRC.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        text = path.read_text()
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        new = rewrite_imports(text, module, owner, moves, renames, where)
        new = rewrite_references(new, owner, moves, renames, where)
        if path.parent != SRC:
            new = deeper_file_paths(new, where)
        if new != text:
            path.write_text(new)
    this = Path(__file__).resolve()
    for pattern in OUTSIDE:
        for path in sorted(ROOT.glob(pattern)):
            if path.resolve() == this or not path.is_file():
                continue
            where = str(path.relative_to(ROOT))
            text = path.read_text()
            for pattern, fixed in TEXT_FIXES.get(where, []):
                text = re.sub(pattern, fixed, text, flags=re.M)
            new = rewrite_from_imports_outside(text, owner, renames, moves, where) if path.suffix == ".py" else text
            new = rewrite_references(new, owner, moves, renames, where)
            if new != text:
                path.write_text(new)
    for path in [*SRC.rglob("*.py"), *(p for pattern in OUTSIDE for p in ROOT.glob(pattern) if p.is_file())]:
        if path.resolve() == this:
            continue
        text = path.read_text()
        if NEW in text:
            path.write_text(text.replace(NEW, PACKAGE))
    # 3. Packaging and the layer contract.
    update_pyproject(subpackages)
    (ROOT / ".importlinter").write_text(importlinter())
    git("add", "-A", PACKAGE, ".importlinter")
    try:
        written = [f"{PACKAGE}/{t.replace('.', '/')}.py" for t in parts if parts[t]["body"]]
        # Unused imports only in the modules written from split ones (each got the whole import block); elsewhere an
        # import that looks unused may be a re-export (`from x import y as y`).
        subprocess.run(["ruff", "check", "--fix", "--select", "F401", "-q", *written], cwd=ROOT, check=False)
        subprocess.run(["ruff", "check", "--fix", "--select", "I", "-q", PACKAGE, "tests", "benchmarks", "examples",
                        "scripts"], cwd=ROOT, check=False)
    except FileNotFoundError:
        notes.append("ruff is not installed: run `ruff check --fix` yourself (imports to sort, unused ones to drop)")
    rewritten = [p for p in [*SRC.rglob("*.py"), *(p for d in OUTSIDE_CODE for p in ROOT.glob(f"{d}/**/*.py"))]
                 if p.resolve() != this]
    for path in rewritten:
        text = path.read_text()
        new = reflow(text)
        if new != text:
            path.write_text(new)
    long_lines = [f"{path.relative_to(ROOT)}:{n}" for path in rewritten
                  for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 119]
    if long_lines:
        notes.append("lines over 119 characters: " + ", ".join(long_lines))
    print(f"relayout: moved {len(moves)} modules, split {', '.join(f for f in SPLITS if f in original_docs)} into "
          f"{len([t for t in parts if parts[t]['body']])} modules, in {', '.join(subpackages)}.")
    if notes:
        print("Check by hand:", *notes, sep="\n  ")
    return 0


def reflow(text: str, width: int = 119) -> str:
    """Lines of docstrings and comments that a longer module path made too long: the words past `width` go to the
    start of the next line of the same paragraph (or a new line with the same indent)."""
    import io
    import tokenize

    lines = text.splitlines(keepends=True)
    for _ in range(200):
        prose = set()  # 0-based numbers of lines inside triple-quoted strings, or whole-line comments
        for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            if token.type == tokenize.STRING and token.string.lstrip("rbuRBU")[:3] in ('"""', "'''"):
                prose.update(range(token.start[0] - 1, token.end[0]))
            elif token.type == tokenize.COMMENT and not lines[token.start[0] - 1][:token.start[1]].strip():
                prose.add(token.start[0] - 1)
        long = [i for i, line in enumerate(lines) if len(line.rstrip("\n")) > width and i in prose]
        if not long:
            break
        i = long[0]
        line = lines[i].rstrip("\n")
        indent = line[:len(line) - len(line.lstrip())]
        comment = line.lstrip().startswith("#")
        lead = indent + ("# " if comment else "")
        cut = line.rfind(" ", len(lead) + 1, width + 1)
        if cut == -1:
            break
        head, tail = line[:cut], line[cut + 1:]
        following = lines[i + 1] if i + 1 < len(lines) else ""
        same = (i + 1 in prose and following.startswith(lead) and following[len(lead):len(lead) + 1].strip()
                and not following.lstrip().startswith(("-", "*", ">>>", "```", '"""')) and not tail.endswith('"""'))
        if same and comment == following.lstrip().startswith("#"):
            lines[i + 1] = lead + tail + " " + following[len(lead):]
        else:
            lines.insert(i + 1, lead + tail + "\n")
        lines[i] = head + "\n"
    return "".join(lines)


def wrap_doc(doc: str) -> str:
    if "\n" in doc:
        return doc
    lines = wrap(doc, 113).splitlines()
    return "\n".join(lines) + ("\n" if len(lines) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
