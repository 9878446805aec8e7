"""Recipe schema: every bad input is one RecipeError line naming the dotted field and the fix."""

import json

import pytest

from ia3_trainer import RecipeError, apply_overrides, load_recipe
from ia3_trainer.recipe import Recipe, list_shipped_recipes

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
