"""ia3-trainer sweep --grid: every grid point validated first, then trained in its own subfolder (an Optuna study with
a grid sampler, `tests/test_search.py`); a table of metrics."""

import hashlib
import json
from pathlib import Path

import pytest

from ia3_trainer import InputError, RecipeError
from ia3_trainer.cli.main import main
from ia3_trainer.training.sweep import format_table, grid_points, parse_grid, plan_sweep, point_name, point_names

from conftest import tiny_recipe


def test_parse_grid():
    assert parse_grid(["training.learning_rate=3e-3,8e-3", "training.seed=1"]) == {
        "training.learning_rate": [0.003, 0.008], "training.seed": [1]
    }
    assert parse_grid(['ia3.target_modules=[["k","v"],["q"]]']) == {"ia3.target_modules": [["k", "v"], ["q"]]}
    assert parse_grid(["training.lr_scheduler_type=linear,cosine"])["training.lr_scheduler_type"] == ["linear",
                                                                                                     "cosine"]
    # A malformed --grid is bad command-line input (an InputError, a ValueError), not a problem of the recipe.
    for bad, message in [("training.learning_rate", "expected key=v1,v2"), ("training.seed=1,1", "duplicate"),
                         ("training.output_dir=a,b", "the sweep sets it"),
                         ("training.learning_rate=[]", "has no values")]:  # was an IndexError
        with pytest.raises(ValueError, match=message) as info:
            parse_grid([bad])
        assert type(info.value) is InputError
    with pytest.raises(ValueError, match="given twice") as info:
        parse_grid(["training.seed=1", "training.seed=2"])
    assert type(info.value) is InputError


def test_grid_points_and_names():
    points = grid_points({"training.learning_rate": [0.1, 0.3], "training.seed": [1, 2]})
    assert points == [{"training.learning_rate": 0.1, "training.seed": 1},
                      {"training.learning_rate": 0.1, "training.seed": 2},
                      {"training.learning_rate": 0.3, "training.seed": 1},
                      {"training.learning_rate": 0.3, "training.seed": 2}]
    assert point_name(points[1]) == "learning_rate=0.1,seed=2"
    # "/" is unsafe in a folder name: it becomes "_", and a hash of the exact values keeps the name unique.
    assert point_name({"ia3.target_modules": ["k", "v"], "model.name_or_path": "org/model"}) == (
        "target_modules=k+v,name_or_path=org_model-" + hashlib.sha256(
            b'{"ia3.target_modules": ["k", "v"], "model.name_or_path": "org/model"}').hexdigest()[:8])


def test_every_point_is_validated_before_any_training(tmp_path):
    grid = {"training.learning_rate": [0.1, "fast"], "training.lerning_rate": [1]}
    with pytest.raises(RecipeError) as info:
        plan_sweep(tiny_recipe(tmp_path), grid)
    assert "did you mean 'training.learning_rate'?" in str(info.value)
    assert not (tmp_path / "out").exists()
    # A bad grid value is blamed on --grid, where it was typed.
    with pytest.raises(RecipeError, match=r"^sweep point learning_rate=fast: --grid: training.learning_rate: "
                                          r"expected a number, got str"):
        plan_sweep(tiny_recipe(tmp_path), {"training.learning_rate": [0.1, "fast"]})
    plan = plan_sweep(tiny_recipe(tmp_path), {"training.learning_rate": [0.1, 0.3]})
    assert [recipe.training["output_dir"] for _, recipe in plan] == [
        str(tmp_path / "out" / "learning_rate=0.1"), str(tmp_path / "out" / "learning_rate=0.3")]
    assert [recipe.training["learning_rate"] for _, recipe in plan] == [0.1, 0.3]


def test_sweep_command_trains_each_point_and_prints_a_table(tmp_path, capsys):
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 2, "training.eval_strategy": "no"})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    argv = ["sweep", str(path), "--grid", "training.learning_rate=0.01,0.3", "--set", "data.max_eval_samples=8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| learning_rate | train_loss | eval_loss | eval_perplexity | eval_label_accuracy")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| 0.01", "| 0.3"]
    assert table[0].endswith("| state | output_dir |") and all("| COMPLETE |" in row for row in table[2:])
    assert "best: trial " in out

    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [row["training.learning_rate"] for row in rows] == [0.01, 0.3]
    assert rows[0]["train_loss"] != rows[1]["train_loss"]  # the points really differ
    for row in rows:
        folder = tmp_path / "out" / f"learning_rate={row['training.learning_rate']}"
        assert row["output_dir"] == str(folder)
        assert (folder / "adapter_model.safetensors").is_file()
        assert json.loads((folder / "recipe.json").read_text())["training"]["learning_rate"] == row[
            "training.learning_rate"]

    # The same sweep again continues its study, which is done: nothing trains again, the same table prints.
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file() and "=" in p.parent.name}
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again[again.index("| learning_rate"):] == out[out.index("| learning_rate"):]
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
    assert main([*argv, "--overwrite"]) == 0  # starts the study over: both runs replaced
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in trained.items() if p.name == "adapter_model.safetensors")


def test_format_table_skips_timings():
    rows = [{"training.seed": 1, "train_loss": 1.23456, "eval_runtime": 3.0, "eval_rouge1": float("nan")}]
    assert format_table(rows, ["training.seed"]).splitlines() == [
        "| seed | train_loss | eval_rouge1 |", "|---|---|---|", "| 1 | 1.235 | nan |"]


def test_bad_grid_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "tiny", "--grid", "training.learning_rat=1,2"])
    assert info.value.code == 2
    assert "did you mean 'training.learning_rate'?" in capsys.readouterr().err


def test_points_that_differ_only_in_unsafe_characters_get_their_own_folders(tmp_path):
    # "a b: " and "a_b: " both sanitise to "a_b__": before the hash, the second point overwrote the first.
    grid = {"data.source_prefix": ["a b: ", "a_b: ", "a_b__"]}
    plan = plan_sweep(tiny_recipe(tmp_path), grid)
    folders = [recipe.training["output_dir"] for _, recipe in plan]
    assert len(set(folders)) == 3
    assert [recipe.data.source_prefix for _, recipe in plan] == ["a b: ", "a_b: ", "a_b__"]
    assert folders[2] == str(tmp_path / "out" / "source_prefix=a_b__")  # nothing to sanitise: no hash
    for folder in folders[:2]:
        assert Path(folder).parent == tmp_path / "out" and Path(folder).name.startswith("source_prefix=a_b__-")


def test_points_whose_values_share_a_text_form_get_their_own_folders(tmp_path):
    # ["none"] and "none" both read "none", and Review/review are one folder on macOS and Windows: before, the second
    # point trained into the first one's folder while sweep.json listed both.
    points = [{"ia3.target_modules": ["none"]}, {"ia3.target_modules": "none"}, {"ia3.target_modules": ["k", "v"]}]
    names = point_names(points)
    assert len(set(names)) == 3 and names[2] == "target_modules=k+v"
    assert all(name.startswith("target_modules=none-") for name in names[:2])
    plan = plan_sweep(tiny_recipe(tmp_path), {"data.source_prefix": ["Review", "review"]})
    folders = [Path(recipe.training["output_dir"]).name for _, recipe in plan]
    assert len({folder.casefold() for folder in folders}) == 2
    assert folders[0].startswith("source_prefix=Review-") and folders[1].startswith("source_prefix=review-")


def test_a_sweep_of_another_search_is_refused_unless_overwrite(tmp_path, capsys):
    # The sweep folder's study and sweep.json are a sweep's only record: another search into the same output_dir
    # used to replace them without a word.
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 1, "data.max_eval_samples": 8})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    results = tmp_path / "out" / "sweep.json"
    assert main(["sweep", str(path), "--grid", "training.learning_rate=0.01"]) == 0
    first = results.read_bytes()
    assert [row["training.learning_rate"] for row in json.loads(first)] == [0.01]
    capsys.readouterr()

    other = ["sweep", str(path), "--grid", "training.seed=1,2"]
    with pytest.raises(SystemExit) as info:
        main(other)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"ia3-trainer: error: --study tiny: sqlite:///{tmp_path / 'out' / 'study.db'} holds study 'tiny' "
                    "of another search (--grid training.learning_rate=0.01, objective eval_label_accuracy "
                    "(maximize)); pass --overwrite to replace it, --study NAME for a new study, or choose another "
                    "training.output_dir")
    assert results.read_bytes() == first and not (tmp_path / "out" / "seed=1").exists()  # refused before training

    # A new study beside it may not take over sweep.json, nor a sweep.json that is no sweep's results.
    with pytest.raises(SystemExit):
        main([*other, "--study", "seeds"])
    assert f"{results} holds the results of study {{'tiny'}}; pass --overwrite" in capsys.readouterr().err
    results.write_text("not json")
    with pytest.raises(SystemExit):
        main([*other, "--study", "seeds"])
    assert "holds a file that is not a sweep's results; pass --overwrite" in capsys.readouterr().err

    assert main([*other, "--overwrite"]) == 0
    assert [row["training.seed"] for row in json.loads(results.read_text())] == [1, 2]
    assert (tmp_path / "out" / "learning_rate=0.01" / "adapter_model.safetensors").is_file()  # other points kept


def test_sweep_json_writes_non_finite_metrics_as_null(tmp_path):
    from ia3_trainer import IA3Seq2SeqTrainer
    from ia3_trainer.jsonfiles import read_json
    from ia3_trainer.training.search import run_search

    class Overflowing(IA3Seq2SeqTrainer):  # a perplexity of a loss over 709 is inf; a ROUGE of no text is NaN
        def train(self, *args, **kwargs):
            output = super().train(*args, **kwargs)
            output.metrics.update(eval_perplexity=float("inf"), eval_rouge1=float("nan"))
            return output

    raw = tiny_recipe(tmp_path, **{"training.max_steps": 1, "data.max_eval_samples": 8})
    rows = run_search(raw, grid={"training.seed": [1]}, trainer_cls=Overflowing)
    assert rows[0]["eval_perplexity"] == float("inf")  # the rows returned keep the numbers
    [saved] = read_json(tmp_path / "out" / "sweep.json")  # strict JSON: no NaN, no Infinity
    assert saved["eval_perplexity"] is None and saved["eval_rouge1"] is None and saved["training.seed"] == 1
