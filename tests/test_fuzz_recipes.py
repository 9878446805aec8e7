"""Hostile recipes: every mutated recipe is accepted, or rejected with a RecipeError whose lines name the field.

Hypothesis mutates the shipped tiny recipe (wrong types, unknown keys, missing sections, huge numbers, negative sizes,
empty label lists) and the file around it (non-UTF-8 bytes, trailing garbage, truncation, deep nesting), then runs
`load_recipe` on the file and `ia3-trainer validate` on it. Any other exception is a bug in recipe.py. `validate`
leaves out the checks transformers makes itself (`load_recipe(..., library_checks=False)`): it accepts what
`load_recipe` accepts, and may accept more.
"""

import contextlib
import copy
import io
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ia3_trainer import RecipeError, load_recipe
from ia3_trainer.cli.main import main
from ia3_trainer.recipe.overrides import SECTIONS, known_keys

from conftest import TINY_MODEL_DIR, tiny_recipe


BASE = tiny_recipe(Path(tempfile.gettempdir()) / "ia3-fuzz")  # validation never writes to output_dir
FILE_PROBLEMS = ("invalid JSON at line", "not UTF-8 text", "the recipe must be a JSON object", "nested too deeply",
                 "non-finite number ")
MORE = re.compile(r"^[\d,]+ more problem\(s\) not shown; fix the ones above and run again$")
# No example database: nothing is written into the checkout.
SETTINGS = settings(max_examples=500, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, -1, -(2**63), 2**63, 2**64 + 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", " ", "none", "no", "steps", "epoch", "auto", "cpu", "cuda", "../..", "hf://x", "os.system",
                     "\ud800", "a\x00b", "\u202e", "\n"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=10)


@st.composite
def section_keys(draw):
    section = draw(st.sampled_from([*SECTIONS, "trainig", "models", ""]) | st.text(max_size=8))
    known = sorted(known_keys(section) or [])
    key = draw(st.sampled_from(known) | st.text(max_size=10)) if known else draw(st.text(max_size=10))
    return section, key


@st.composite
def recipes(draw):
    """The tiny recipe with a few mutations: set a key, delete a key or section, or replace a section."""
    raw = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "set", "set", "delete", "replace", "label_names"]))
        section, key = draw(section_keys())
        if action == "set":
            node = raw.setdefault(section, {})
            if isinstance(node, dict):
                node[key] = draw(values)
            else:
                raw[section] = draw(values)
        elif action == "delete":
            node = raw.get(section)
            if isinstance(node, dict) and draw(st.booleans()):
                node.pop(draw(st.sampled_from(sorted(node)) if node else st.just(key)), None)
            else:
                raw.pop(section, None)
        elif action == "replace":
            raw[section] = draw(values)
        else:
            if not isinstance(raw.get("data"), dict):
                raw["data"] = {}
            raw["data"]["label_names"] = draw(st.lists(scalars, max_size=3))
    return raw


@st.composite
def files(draw):
    """Recipe bytes: valid JSON, or broken on purpose."""
    raw = draw(st.one_of(recipes(), recipes(), recipes(), values))
    text = json.dumps(raw, allow_nan=True, ensure_ascii=draw(st.booleans()))
    data = text.encode("utf-8", errors="surrogatepass")  # a lone surrogate makes bytes that are not UTF-8
    damage = draw(st.sampled_from(["none", "none", "garbage", "truncate", "latin-1", "bytes", "bom", "deep"]))
    if damage == "garbage":
        data += draw(st.sampled_from([b"}", b",", b" trailing", b"\x00", b"{}", b"\n// comment"]))
    elif damage == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif damage == "latin-1":
        data = json.dumps({**raw, "description": "caf\xe9"} if isinstance(raw, dict) else raw, ensure_ascii=False
                          ).encode("latin-1", errors="replace")
    elif damage == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "deep":
        depth = draw(st.sampled_from([20, 40, 900, 2000, 100_000]))
        data = (b'{"model": {"name_or_path": "x"}, "data": {"path": "json", "data_files": ' + b"[" * depth
                + b"]" * depth + b"}}")
    return data


def dotted_keys(raw):
    """Every section and `section.key` of the recipe and of the schema: the names an error line may start with."""
    keys = set(SECTIONS)
    for section in SECTIONS:
        keys |= {f"{section}.{key}" for key in known_keys(section) or []}
    if isinstance(raw, dict):
        for key, value in raw.items():
            keys.add(key)
            if isinstance(value, dict):
                keys |= {f"{key}.{inner}" for inner in value}
    return keys


def check_error(error: RecipeError, path, raw, overridden=()):
    """Each line names the file (or `--set`, for a key an override set) and a key; at most 10 problems are spelled
    out, then one line counts the rest."""
    assert error.errors, "a RecipeError with no message"
    assert len(error.errors) <= 11
    keys = dotted_keys(raw) | set(overridden)
    for number, line in enumerate(error.errors):
        where = "--set" if line.startswith("--set: ") else str(path)
        assert line.startswith(f"{where}: "), line
        rest = line[len(f"{where}: "):]
        if MORE.match(rest):
            assert number == 10 == len(error.errors) - 1, line
        elif where == "--set":
            assert any(rest.startswith(f"{key}: ") or rest.startswith(f"{key}.") for key in overridden), line
        else:
            assert rest.startswith(FILE_PROBLEMS) or any(rest.startswith(f"{key}: ") for key in keys), line


def parse(data):
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def run_cli(path):
    """`ia3-trainer validate path` with stdout and stderr that, like a terminal's, must encode what is printed."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(["validate", str(path)])
        except SystemExit as exit_:
            code = exit_.code
        stdout.flush(), stderr.flush()
    return code, stderr.buffer.getvalue().decode("utf-8")


@SETTINGS
@given(data=files())
@example(data=b'{"model": {"name_or_path": "x"}, "data": {"path": "json"}} trailing')
@example(data=b"\xff\xfe{}")
@example(data=json.dumps({"model": {"name_or_path": "x"}, "data": {"path": "json"},
                          "training": {"accelerator_config": ""}}).encode())
@example(data=json.dumps({"model": {"name_or_path": "x"}, "data": {"path": "json"},
                          "training": {"lr_scheduler_type": ["linear"]}}).encode())
@example(data=json.dumps({"model": {"name_or_path": "x"}, "data": {"path": "json"},
                          "training": {"deepspeed": "cpu"}}).encode())
@example(data=b"[" * 10_000)
@example(data=b'{"name": "\\ud800", "model": {"name_or_path": "x"}, "data": {"path": "json"}}')
@example(data=json.dumps({"model": {"name_or_path": "x"}, "data": {"path": "json", "label_names": []}}).encode())
@example(data=json.dumps({"model": {"name_or_path": "x"}, "data": {"path": "json", "max_source_length": -3}}).encode())
@example(data=json.dumps({"model": {"name_or_path": "x"}, "data": {"path": "json"},
                          "training": {"per_device_train_batch_size": 10**30}}).encode())
def test_validate_accepts_or_names_the_field(tmp_path, data):
    path = tmp_path / "recipe.json"
    path.write_bytes(data)
    raw = parse(data)
    accepted = {}
    for library_checks in (True, False):
        try:
            load_recipe(str(path), library_checks=library_checks)
            accepted[library_checks] = True
        except RecipeError as error:
            check_error(error, path, raw)
            accepted[library_checks] = False
    assert accepted[False] or not accepted[True]
    code, stderr = run_cli(path)
    assert code == (0 if accepted[False] else 2), stderr
    if not accepted:
        assert stderr.startswith(f"ia3-trainer: error: {path}: "), stderr
        assert "Traceback" not in stderr


@SETTINGS
@given(overrides=st.lists(st.one_of(
    st.builds(lambda key, value: f"{key[0]}.{key[1]}={json.dumps(value, allow_nan=True)}", section_keys(), values),
    st.builds(lambda key, text: f"{key[0]}.{key[1]}={text}", section_keys(), st.text(max_size=12)),
    st.text(max_size=20),
), min_size=1, max_size=3))
def test_overrides_accept_or_name_the_field(tmp_path, overrides):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(BASE))
    try:
        load_recipe(str(path), overrides)
    except RecipeError as error:
        malformed = [item for item in overrides if "=" not in item or not item.partition("=")[0].strip()]
        if malformed:  # not key=value at all: the first such item is named
            assert error.errors == [f"--set {malformed[0]!r}: expected key=value, e.g. training.learning_rate=1e-2"]
            return
        keys = [item.partition("=")[0].strip() for item in overrides]
        check_error(error, path, BASE, overridden=keys)


def test_recipes_hold_no_code(tmp_path):
    """Strings are data: import paths and code in any string field are never imported or run."""
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    raw = tiny_recipe(tmp_path)
    raw["description"] = code  # (a name is one folder name of safe characters: test_trust.py)
    # Names of importable modules that nothing else imports: if a string field were imported, they would load.
    unused = ("this", "tabnanny", "ia3_trainer.no_such_module")
    assert not set(unused) & set(sys.modules)
    raw["data"].update(source_prefix=code, text_column=unused[0], label_column=code)
    raw["training"]["run_name"] = unused[1]
    raw["model"]["tokenizer_name_or_path"] = unused[2]
    load_recipe(raw)
    assert not marker.exists()
    assert not set(unused) & set(sys.modules)
    for key in ("_component_", "_target_", "__class__"):
        for section in ("model", "data", "training", "ia3", "hub"):
            bad = tiny_recipe(tmp_path)
            bad.setdefault(section, {})[key] = "ia3_trainer.training.trainer.IA3Seq2SeqTrainer"
            with pytest.raises(RecipeError, match=rf": {section}\.{key}: unknown key"):
                load_recipe(bad)


def test_trust_remote_code_is_off_unless_set_and_announced(tmp_path, capsys):
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 1, "data.validation_size": 0})
    assert load_recipe(raw).model.trust_remote_code is False
    bad = tiny_recipe(tmp_path, **{"model.trust_remote_code": "yes"})
    with pytest.raises(RecipeError, match=r"model.trust_remote_code: expected true/false, got str"):
        load_recipe(bad)

    # A model folder whose config asks for its own code: without trust_remote_code that code never runs.
    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model_dir)
    marker = tmp_path / "remote-code-ran"
    (model_dir / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForSeq2SeqLM": "evil.Model"}
    (model_dir / "config.json").write_text(json.dumps(config))
    raw["model"]["name_or_path"] = str(model_dir)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    assert main(["train", str(path)]) == 0
    assert not marker.exists()
    assert "trust_remote_code is on" not in capsys.readouterr().out

    raw["model"]["name_or_path"] = str(TINY_MODEL_DIR)
    raw["model"]["trust_remote_code"] = True
    path.write_text(json.dumps(raw))
    assert main(["train", str(path), "--overwrite"]) == 0
    assert (f"ia3-trainer: model.trust_remote_code is on: code from {TINY_MODEL_DIR} will run"
            in capsys.readouterr().out)
