"""Recipe schema: every bad input is one RecipeError line naming the dotted field and the fix."""

import ast
import difflib
import json
import math
import os
import re

import pytest

from ia3_trainer import PathError, RecipeError, apply_overrides, load_recipe
from ia3_trainer.errors import first_line, one_line, redact
from ia3_trainer.jsonfiles import read_json
from ia3_trainer.recipe import field_types
from ia3_trainer.recipe.loading import HubSection, Recipe, check_repo_id, list_shipped_recipes, load_saved_recipe
from ia3_trainer.recipe.schema import check_type, describe

from conftest import REPO, TINY_MODEL_DIR, tiny_recipe


def errors_of(raw, source=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(raw, source=source)
    return info.value.errors


def test_tiny_recipe_resolves_recipe_relative_paths():
    recipe = load_recipe("tiny")
    assert recipe.name == "tiny"
    assert recipe.model.name_or_path == str(TINY_MODEL_DIR)
    assert recipe.data.data_files == {"train": str(REPO / "recipes" / "assets" / "tiny-sentiment.jsonl")}
    assert recipe.training_args().learning_rate == 0.3
    assert recipe.ia3_config().feedforward_modules == {"wo"}


def test_shipped_names_are_listed():
    assert {"tiny", "phrasebank"} <= set(list_shipped_recipes())


def test_defaults_fill_in(tmp_path):
    raw = {"model": {"name_or_path": "t5-small"}, "data": {"path": "csv"}}
    recipe = Recipe.from_dict(raw)
    assert recipe.data.max_target_length == 3 and recipe.data.validation_size == 0.1
    assert recipe.training["output_dir"] == "outputs/ia3-run"
    assert recipe.ia3_config().target_modules is None  # peft's per-architecture default


def test_unknown_key_suggests_the_close_one(tmp_path):
    raw = tiny_recipe(tmp_path)
    raw["training"]["learning_rat"] = 1e-3
    raw["data"]["text_colum"] = "x"
    errors = errors_of(raw, source="r.json")
    assert "r.json: training.learning_rat: unknown key; did you mean 'training.learning_rate'?" in errors
    assert "r.json: data.text_colum: unknown key; did you mean 'data.text_column'?" in errors


def test_unknown_section():
    errors = errors_of({"model": {"name_or_path": "x"}, "data": {"path": "csv"}, "trainig": {}})
    assert errors == ["<recipe>: trainig: unknown section; did you mean 'training'?"]


def test_wrong_types_are_named():
    raw = {"model": {"name_or_path": 7}, "data": {"path": "csv", "max_target_length": "3"},
           "training": {"learning_rate": "fast", "num_train_epochs": True}}
    errors = errors_of(raw)
    assert any(e.startswith("<recipe>: model.name_or_path: expected a string, got int") for e in errors)
    assert any(e.startswith("<recipe>: data.max_target_length: expected an integer, got str") for e in errors)
    assert any(e.startswith("<recipe>: training.learning_rate: expected a number, got str") for e in errors)
    assert any(e.startswith("<recipe>: training.num_train_epochs: expected a number, got bool") for e in errors)


def test_missing_required_field_and_section():
    errors = errors_of({"model": {"revision": "main"}})
    assert any(e.startswith("<recipe>: model.name_or_path: missing required field") for e in errors)
    assert any(e.startswith("<recipe>: data: missing section") for e in errors)


def test_all_problems_in_one_error():
    raw = {"model": {"name_or_path": "x", "dtype": "fp8"}, "data": {"path": "csv", "validation_size": 1.5},
           "ia3": {"target_modules": ["k", "v"], "feedforward_modules": ["wo"]}}
    errors = errors_of(raw)
    assert len(errors) == 3
    assert errors[0].startswith('<recipe>: model.dtype: expected one of "auto", "float32", "bfloat16", "float16"')
    assert "<recipe>: ia3.feedforward_modules: must be a subset of target_modules ['k', 'v']" in errors
    assert any("data.validation_size: a fraction must be in [0, 1)" in e for e in errors)


def test_enum_training_values_are_checked():
    errors = errors_of({"model": {"name_or_path": "x"}, "data": {"path": "csv"},
                        "training": {"lr_scheduler_type": "wobbly"}})
    assert errors[0].startswith('<recipe>: training.lr_scheduler_type: expected one of "linear", "cosine"')


def test_training_arguments_own_check_is_reported_under_training():
    # TrainingArguments itself rejects this combination; the message comes back under `training`.
    raw = {"model": {"name_or_path": "x"}, "data": {"path": "csv"},
           "training": {"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "steps"}}
    errors = errors_of(raw)
    assert len(errors) == 1 and errors[0].startswith("<recipe>: training: ")


def test_library_checks_false_leaves_out_only_what_transformers_and_peft_check_themselves():
    # What `ia3-trainer validate` checks: the combination above is left to `train`, which builds the arguments ...
    raw = {"model": {"name_or_path": "x"}, "data": {"path": "csv"},
           "training": {"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "steps"}}
    assert Recipe.from_dict(raw, library_checks=False).training["save_strategy"] == "steps"
    # ... and the rest is checked as before, the cross-section checks read off the training section itself.
    raw["data"]["validation_size"] = 0
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(raw, library_checks=False)
    assert info.value.errors == [
        "<recipe>: training.eval_strategy: is 'epoch' but there is no validation data; set data.validation_split "
        "or data.validation_size > 0, or eval_strategy 'no'",
        "<recipe>: training.load_best_model_at_end: needs validation data; set data.validation_size > 0"]


# JSON values, each of which some field type takes and others refuse.
SAMPLE_VALUES = [None, True, False, 0, -1, 1.5, "", "x", "steps", "STEPS", "adamw_torch", "linear", "stop", "no",
                 "underflow_overflow", "SEQ_2_SEQ_LM", "/tmp/x", [], ["x"], [1], {}, {"a": 1}, {"a": True}]


def test_the_stored_field_types_are_the_classes_own():
    """`field_types.json` (what the `ia3` and `training` sections are checked against without importing peft or
    transformers) says what the classes say, and reads back as `check_type` reads the classes' own types."""
    from peft import IA3Config

    from ia3_trainer.recipe.training_args import IA3TrainingArguments

    fix = "the stored field types are stale: run python scripts/store_field_types.py"
    stored = json.loads(field_types.STORED.read_text(encoding="utf-8"))
    assert field_types.releases(stored["versions"]) == field_types.releases(field_types.library_versions()), fix
    assert field_types.stored_field_types() is not None, fix
    for section, cls in (("ia3", IA3Config), ("training", IA3TrainingArguments)):
        types = field_types.read_field_types(cls)
        assert stored[section] == {name: field_types.to_json(annotation) for name, annotation in types.items()}, fix
        read_back = field_types.stored_field_types()[section]
        for name, annotation in types.items():
            assert describe(read_back[name]) == describe(annotation), name
            for value in SAMPLE_VALUES:
                assert check_type(value, read_back[name]) == check_type(value, annotation), (name, value)


def test_eval_needs_validation_data():
    raw = {"model": {"name_or_path": "x"}, "data": {"path": "csv", "validation_size": 0},
           "training": {"eval_strategy": "epoch"}}
    assert errors_of(raw) == [
        "<recipe>: training.eval_strategy: is 'epoch' but there is no validation data; set data.validation_split "
        "or data.validation_size > 0, or eval_strategy 'no'"
    ]


def test_trainer_push_options_point_to_hub_section():
    raw = {"model": {"name_or_path": "x"}, "data": {"path": "csv"}, "training": {"push_to_hub": True}}
    assert errors_of(raw) == ["<recipe>: training.push_to_hub: not allowed in a recipe; use hub.repo_id instead"]


def test_ia3_reserved_and_label_checks():
    raw = {"model": {"name_or_path": "x"}, "ia3": {"task_type": "CAUSAL_LM"},
           "data": {"path": "csv", "label_names": [], "label_column": "sentence"}}
    errors = errors_of(raw)
    assert "<recipe>: ia3.task_type: set by the trainer; remove it from the recipe" in errors
    assert "<recipe>: data.label_names: is empty; list the label texts, or remove the key" in errors
    assert "<recipe>: data.label_column: is the same column as data.text_column ('sentence')" in errors


def test_overrides_parse_json_then_fall_back_to_string(tmp_path):
    raw = tiny_recipe(tmp_path)
    recipe = load_recipe(raw, ["training.learning_rate=1e-2", "model.revision=v1.0", "data.label_names=[\"a\",\"b\"]",
                               "data.load_kwargs.encoding=latin-1"])
    assert recipe.training["learning_rate"] == 0.01
    assert recipe.model.revision == "v1.0"
    assert recipe.data.label_names == ["a", "b"]
    assert recipe.data.load_kwargs == {"encoding": "latin-1"}
    recipe = load_recipe(raw, {"training.warmup_steps": 3, "model.name_or_path": "/local/model"})
    assert recipe.training["warmup_steps"] == 3 and recipe.model.name_or_path == "/local/model"


def test_override_of_unknown_key_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"training.learnin_rate: unknown key; did you mean 'training.learning_ra"):
        apply_overrides(tiny_recipe(tmp_path), ["training.learnin_rate=1"])
    with pytest.raises(RecipeError, match=r"--set 'training.learning_rate': expected key=value"):
        apply_overrides(tiny_recipe(tmp_path), ["training.learning_rate"])


def test_bad_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model": {"name_or_path": "x"}} trailing')
    with pytest.raises(RecipeError, match=r"bad.json: invalid JSON at line 1 column 34: Extra data"):
        load_recipe(bad_json)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin.json: not UTF-8 text"):
        load_recipe(latin)
    with pytest.raises(RecipeError, match=r"nope.json: no such recipe file or shipped recipe \(shipped: .*tiny"):
        load_recipe(tmp_path / "nope.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(RecipeError, match=r"list.json: the recipe must be a JSON object, got list"):
        load_recipe(listed)


BAD_RECIPES = sorted((REPO / "tests" / "data" / "bad_recipes").glob("*.json"))


@pytest.mark.parametrize("path", BAD_RECIPES, ids=lambda p: p.stem)
def test_bad_recipe_fixtures_fail_with_their_expected_message(path):
    expected = json.loads(path.read_text())["description"].split("expect: ", 1)[1]
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value)


def test_save_round_trip(tmp_path):
    recipe = load_recipe("tiny")
    saved = recipe.save(tmp_path)
    again = load_recipe(saved)
    assert again.to_dict() == recipe.to_dict()


def test_credentials_and_trainer_hub_options_are_refused(tmp_path):
    raw = tiny_recipe(tmp_path, **{"data.load_kwargs": {"token": "hf_SECRET123", "encoding": "utf-8"},
                                   "training.hub_revision": "main"})
    errors = errors_of(raw)
    assert any(e.startswith("<recipe>: data.load_kwargs.token: not allowed: a recipe is saved as recipe.json")
               for e in errors)
    assert "<recipe>: training.hub_revision: not allowed in a recipe: pushing goes through the hub section" in errors
    assert not any("hf_SECRET123" in e for e in errors)


def test_override_paths_are_relative_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("tiny", ["model.name_or_path=./my-model"])
    assert recipe.model.name_or_path == str(tmp_path / "my-model")
    # the file's own path stays relative to the recipe's folder
    assert recipe.data.data_files["train"].endswith("recipes/assets/tiny-sentiment.jsonl")


def test_hub_repo_id_is_checked_before_training(tmp_path):
    errors = errors_of(tiny_recipe(tmp_path, **{"hub.repo_id": "no-namespace"}))
    assert errors == ["<recipe>: hub.repo_id: 'no-namespace' has no namespace; use 'user/name', e.g. "
                      "'alice/no-namespace'"]


# --- errors: one line, no secret ----------------------------------------------------------------------------------


def test_first_line_and_one_line():
    assert first_line(ValueError("first\nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"
    assert one_line(OSError("a\n  b\tc")) == "OSError: a b c"
    assert one_line(ValueError("x" * 500), limit=20) == "ValueError: " + "x" * 7 + "…"


def test_redact_removes_every_kind_of_token(monkeypatch):
    import huggingface_hub

    env_token, saved_token, given = "hf_envTOKEN123456789", "saved-token-abcdef", "given-secret-42"
    monkeypatch.setenv("HF_TOKEN", env_token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: saved_token)
    text = (f"env {env_token} saved {saved_token} given {given}; {{'authorization': 'Bearer abc.def-ghi'}} "
            f"Authorization: Bearer xyz123456 and a stray hf_{'A1' * 17}")
    assert redact(text, given) == ("env *** saved *** given ***; {'authorization': 'Bearer ***'} "
                                   "Authorization: Bearer *** and a stray hf_***")
    # Ordinary text stays as it is, and a short "token" does not star out every match of it.
    monkeypatch.setenv("HF_TOKEN", "a")
    assert redact("a bearer of news: hf_transfer is a package") == "a bearer of news: hf_transfer is a package"


def test_redact_survives_a_broken_token_store(monkeypatch):
    import huggingface_hub

    def broken():
        raise OSError("token file unreadable")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", broken)
    assert redact("nothing secret here") == "nothing secret here"


# --- the one JSON reader ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ('{"a": NaN}', r"non-finite number NaN; JSON has none"),
    ('{"a": -Infinity}', r"non-finite number -Infinity; JSON has none"),
    ('{"a": 1e400}', r"non-finite number 1e400; JSON has none"),
    ('{"a": 1} x', r"invalid JSON at line 1 column 10: Extra data"),
    ("[" * 100_000 + "]" * 100_000, r"nested too deeply to read"),
    ('{"a": ' + "9" * 5000 + "}", r"cannot read it: Exceeds the limit"),
])
def test_read_json_refuses_in_one_line(tmp_path, text, message):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}") as info:
        read_json(path)
    assert "\n" not in str(info.value)


def test_read_json_missing_file_and_python_nan(tmp_path):
    with pytest.raises(PathError, match=rf"^{re.escape(str(tmp_path / 'nope.json'))}: cannot read it: No "):
        read_json(tmp_path / "nope.json")
    path = tmp_path / "metrics.json"
    path.write_text('{"eval_perplexity": Infinity, "x": NaN}')  # what json.dumps writes for an overflowed metric
    values = read_json(path, allow_nan=True)
    assert values["eval_perplexity"] == math.inf and math.isnan(values["x"])


def test_nan_in_a_recipe_file_or_dict_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(tiny_recipe(tmp_path, **{"training.learning_rate": math.nan}), allow_nan=True))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.errors == [f"{path}: non-finite number NaN; JSON has none: write a number or null"]
    raw = tiny_recipe(tmp_path, **{"data.load_kwargs": {"x": [math.inf]}})
    assert errors_of(raw) == ["<recipe>: data.load_kwargs: must be a finite number, got inf"]


# --- blame: the file, or --set -----------------------------------------------------------------------------------


def test_problems_are_blamed_on_where_they_came_from(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(tiny_recipe(tmp_path, **{"training.learning_rate": "abc"})))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.errors == [f'{path}: training.learning_rate: expected a number, got str "abc"']

    path.write_text(json.dumps(tiny_recipe(tmp_path, **{"data.max_source_length": 0})))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["training.learning_rate=abc", "hub.repo_id=no-namespace", "data.load_kwargs.token=x"])
    assert info.value.errors == [
        "--set: data.load_kwargs.token: not allowed: a recipe is saved as recipe.json and pushed with the adapter, so "
        "it never holds credentials; set HF_TOKEN or run `hf auth login`",
        f"{path}: data.max_source_length: must be in [1, 1,000,000], got 0",
        "--set: hub.repo_id: 'no-namespace' has no namespace; use 'user/name', e.g. 'alice/no-namespace'",
        '--set: training.learning_rate: expected a number, got str "abc"',
    ]
    # A dict override from Python is an override too; the file's own value is blamed on the file.
    with pytest.raises(RecipeError) as info:
        load_recipe(path, {"training.seed": -1})
    assert info.value.errors == [f"{path}: data.max_source_length: must be in [1, 1,000,000], got 0",
                                 "--set: training.seed: must be in [0, 2**32 - 1], got -1"]


def test_a_training_arguments_problem_is_blamed_on_the_override_it_names(tmp_path):
    best = "training.load_best_model_at_end: --load_best_model_at_end requires the save and eval strategy to match"
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny", ["training.save_strategy=steps", "training.load_best_model_at_end=true"])
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(f"--set: {best}"), info.value.errors
    # The file's own combination stays the file's, whatever else an override sets.
    path = tmp_path / "r.json"
    raw = tiny_recipe(tmp_path)
    raw["training"].update(eval_strategy="epoch", save_strategy="steps", load_best_model_at_end=True)
    path.write_text(json.dumps(raw))
    for overrides in (None, ["training.seed=3"]):
        with pytest.raises(RecipeError) as info:
            load_recipe(path, overrides)
        assert len(info.value.errors) == 1
        assert info.value.errors[0].startswith(f"{path}: training: --load_best_model_at_end requires")


def test_keys_that_are_not_strings_are_one_problem(tmp_path):
    raw = tiny_recipe(tmp_path)
    raw[1] = {}
    assert errors_of(raw) == ["<recipe>: 1: keys must be strings, got int 1"]
    raw = tiny_recipe(tmp_path)
    raw["data"]["load_kwargs"] = {("a",): 1}
    assert errors_of(raw) == ["<recipe>: data.load_kwargs: keys must be strings, got tuple ('a',)"]
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe(tmp_path), {1: 2})
    assert info.value.errors == ['--set: 1: keys must be strings (dotted keys, e.g. "training.seed"), got int']
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe(tmp_path), {"data.load_kwargs": {None: "x"}})
    assert info.value.errors == ["--set: data.load_kwargs: keys must be strings, got null None"]
    with pytest.raises(RecipeError) as info:
        apply_overrides(tiny_recipe(tmp_path), [3])
    assert info.value.errors == ["--set 3: expected a key=value string, got int"]


# --- path fields --------------------------------------------------------------------------------------------------


def test_only_path_fields_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("tiny", ["data.source_prefix=./", "name=x.y", "data.text_column=../sentence",
                                  "training.run_name=./run", "training.output_dir=./out",
                                  "data.data_files.train=./d.jsonl", "model.tokenizer_name_or_path=../tok"])
    assert recipe.data.source_prefix == "./" and recipe.name == "x.y" and recipe.data.text_column == "../sentence"
    assert recipe.training["run_name"] == "./run"
    raw = apply_overrides(tiny_recipe(tmp_path), ["training.deepspeed=./ds.json"])
    assert raw["training"]["deepspeed"] == str(tmp_path / "ds.json")
    raw = apply_overrides(tiny_recipe(tmp_path), ['training.deepspeed={"x": "./keep"}'])
    assert raw["training"]["deepspeed"] == {"x": "./keep"}  # settings given as an object are not a path
    assert recipe.training["output_dir"] == str(tmp_path / "out")
    assert recipe.data.data_files == {"train": str(tmp_path / "d.jsonl")}
    assert recipe.model.tokenizer_name_or_path == str(tmp_path.parent / "tok")


def test_path_fields_of_a_file_are_relative_to_the_file(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    raw = tiny_recipe(tmp_path)
    raw["training"].update(output_dir="./runs/a", accelerator_config="../acc.json", resume_from_checkpoint="./ckpt")
    (tmp_path / "acc.json").write_text("{}")
    raw["data"]["source_prefix"] = "./"
    (folder / "r.json").write_text(json.dumps(raw))
    recipe = load_recipe(folder / "r.json")
    assert recipe.training["output_dir"] == str(folder / "runs" / "a")
    assert recipe.training["accelerator_config"] == str(tmp_path / "acc.json")
    assert recipe.training["resume_from_checkpoint"] == str(folder / "ckpt")  # need not exist to resolve
    assert recipe.data.source_prefix == "./"


# --- hostile inputs -----------------------------------------------------------------------------------------------


def test_200000_unknown_keys_give_ten_lines_and_a_count_fast(tmp_path, monkeypatch):
    # It took 200 s when every key got a did-you-mean search: only the ten lines shown get one (counted, not timed).
    searches = []
    close_matches = difflib.get_close_matches
    monkeypatch.setattr(difflib, "get_close_matches", lambda *a, **k: searches.append(a[0]) or close_matches(*a, **k))
    raw = tiny_recipe(tmp_path)
    raw["training"].update({f"unknown_key_{i}": i for i in range(200_000)})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert len(searches) <= 10, len(searches)
    assert len(info.value.errors) == 11
    assert info.value.errors[0].startswith(f"{path}: training.unknown_key_0: unknown key")
    assert info.value.errors[-1] == f"{path}: 199,990 more problem(s) not shown; fix the ones above and run again"

    searches.clear()
    with pytest.raises(RecipeError) as info:
        apply_overrides(tiny_recipe(tmp_path), {f"training.nope_{i}": 1 for i in range(200_000)})
    assert len(searches) <= 10, len(searches)
    assert len(info.value.errors) == 11 and info.value.errors[0].startswith("--set: training.nope_0: unknown key")
    assert info.value.errors[-1] == "--set: 199,990 more problem(s) not shown; fix the ones above and run again"


def test_int_zero_for_a_float_field_reaches_the_optimizer_as_a_float(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, **{"training.adam_beta1": 0, "training.adam_beta2": 0}))
    assert recipe.training["adam_beta1"] == 0  # the recipe keeps what was written
    args = recipe.training_args()
    assert type(args.adam_beta1) is float and type(args.adam_beta2) is float  # torch's Adam refuses int 0 with a float


# --- hub.repo_id: checked by the section, the same check as the callback's -------------------------------------------


def test_check_repo_id():
    assert check_repo_id("alice/flan-t5-small-ia3") is None
    assert check_repo_id("no-namespace") == (
        "'no-namespace' has no namespace; use 'user/name', e.g. 'alice/no-namespace'")
    assert check_repo_id("alice/bad--name").endswith("; use 'user/name', e.g. 'alice/flan-t5-small-ia3'")
    with pytest.raises(ValueError, match=r"^repo_id: 'x' has no namespace"):
        HubSection(repo_id="x")


# --- recipes read from disk ---------------------------------------------------------------------------------------


def test_load_saved_recipe(tmp_path):
    assert load_saved_recipe(tmp_path) is None
    recipe = load_recipe("tiny")
    recipe.save(tmp_path)
    assert load_saved_recipe(tmp_path).to_dict() == recipe.to_dict()

    # Written on another machine: paths that do not exist here, settings this machine cannot train with (bf16 on a
    # CPU, DeepSpeed without the package), and a trainer subclass's own section.
    saved = recipe.to_dict()
    saved["model"]["name_or_path"] = "/elsewhere/model"
    saved["training"].update(bf16=True, deepspeed="/elsewhere/ds.json")
    saved["prompt"] = {"template": "Review: {text}"}
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    again = load_saved_recipe(tmp_path)
    assert again.model.name_or_path == "/elsewhere/model" and "prompt" not in again.extra

    # A saved recipe is validated like any recipe: no credentials reach load_dataset from it.
    saved["data"]["load_kwargs"] = {"token": "hf_SECRET123", "cache_dir": "/tmp/x"}
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    with pytest.raises(RecipeError) as info:
        load_saved_recipe(tmp_path)
    assert info.value.errors[0].startswith(f"{tmp_path / 'recipe.json'}: data.load_kwargs.token: not allowed")
    (tmp_path / "recipe.json").write_text("{not json")
    with pytest.raises(RecipeError, match=r"recipe.json: invalid JSON at line 1 column 2"):
        load_saved_recipe(tmp_path)


# --- one job per module -------------------------------------------------------------------------------------------


def test_no_module_imports_another_modules_private_names():
    package = REPO / "ia3_trainer"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()  # names bound to our own modules: `from . import predictor`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ia3_trainer")):
                for alias in node.names:
                    if node.module is None:
                        modules.add(alias.asname or alias.name)
                    elif alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{path.name}: from {'.' * node.level}{node.module} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in modules):
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert offenders == []


def test_save_is_whole_or_absent(tmp_path, monkeypatch):
    recipe = load_recipe("tiny")
    recipe.save(tmp_path)
    before = (tmp_path / "recipe.json").read_text()

    def disk_full(fd):  # the text went into the page cache; flushing it to a full disk fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    recipe.name = "changed"
    with pytest.raises(OSError, match="No space left"):
        recipe.save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "recipe.json").read_text() == before
    assert [path.name for path in tmp_path.iterdir()] == ["recipe.json"]


def test_validate_checks_a_recipe_changed_after_loading(tmp_path):
    recipe = Recipe.from_dict(tiny_recipe(tmp_path, **{"training.eval_strategy": "steps", "training.eval_steps": 2}))
    assert recipe.validate() is None  # whole as loaded
    recipe.data.validation_size = 0  # changed in code after loading: no validation data for the evaluations left
    with pytest.raises(RecipeError) as info:
        recipe.validate()
    assert info.value.errors == [
        "<recipe>: training.eval_strategy: is 'steps' but there is no validation data; set data.validation_split or "
        "data.validation_size > 0, or eval_strategy 'no'"]
    recipe.training["eval_strategy"] = "sometimes"  # what IA3TrainingArguments itself refuses is said under training
    with pytest.raises(RecipeError, match=r"^<recipe>: training: sometimes is not a valid"):
        recipe.validate()


def test_bad_overrides_are_reported_together_types_and_ranges():
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny", ["training.learning_rate=-1", 'training.num_train_epochs="x"', "data.max_source_length=0",
                             "ia3.target_modules=[]", "ia3.fan_in_fan_out=3"])
    lines = str(info.value).splitlines()
    for expected in ("training.learning_rate: must be > 0, got -1", "training.num_train_epochs: expected a number",
                     "data.max_source_length: must be in [1,", "ia3.target_modules: is empty",
                     "ia3.fan_in_fan_out: expected"):
        assert sum(expected in line for line in lines) == 1, (expected, lines)
