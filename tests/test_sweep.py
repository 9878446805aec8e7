"""ia3-trainer sweep: every grid point validated first, then trained in its own subfolder; a table of metrics."""

import json

import pytest

from ia3_trainer import RecipeError
from ia3_trainer.cli import main
from ia3_trainer.sweep import format_table, grid_points, parse_grid, plan_sweep, point_name

from conftest import tiny_recipe


def test_parse_grid():
    assert parse_grid(["training.learning_rate=3e-3,8e-3", "training.seed=1"]) == {
        "training.learning_rate": [0.003, 0.008], "training.seed": [1]
    }
    assert parse_grid(['ia3.target_modules=[["k","v"],["q"]]']) == {"ia3.target_modules": [["k", "v"], ["q"]]}
    assert parse_grid(["training.lr_scheduler_type=linear,cosine"])["training.lr_scheduler_type"] == ["linear",
                                                                                                     "cosine"]
    for bad, message in [("training.learning_rate", "expected key=v1,v2"), ("training.seed=1,1", "duplicate"),
                         ("training.output_dir=a,b", "the sweep sets it")]:
        with pytest.raises(RecipeError, match=message):
            parse_grid([bad])
    with pytest.raises(RecipeError, match="given twice"):
        parse_grid(["training.seed=1", "training.seed=2"])


def test_grid_points_and_names():
    points = grid_points({"training.learning_rate": [0.1, 0.3], "training.seed": [1, 2]})
    assert points == [{"training.learning_rate": 0.1, "training.seed": 1},
                      {"training.learning_rate": 0.1, "training.seed": 2},
                      {"training.learning_rate": 0.3, "training.seed": 1},
                      {"training.learning_rate": 0.3, "training.seed": 2}]
    assert point_name(points[1]) == "learning_rate=0.1,seed=2"
    assert point_name({"ia3.target_modules": ["k", "v"], "model.name_or_path": "org/model"}) == (
        "target_modules=k+v,name_or_path=org_model")


def test_every_point_is_validated_before_any_training(tmp_path):
    grid = {"training.learning_rate": [0.1, "fast"], "training.lerning_rate": [1]}
    with pytest.raises(RecipeError) as info:
        plan_sweep(tiny_recipe(tmp_path), grid)
    assert "did you mean 'training.learning_rate'?" in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match=r"sweep point learning_rate=fast: <recipe>: training.learning_rate: "
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
    table = out[out.index("| learning_rate"):].strip().splitlines()
    assert table[0].startswith("| learning_rate | train_loss | eval_loss | eval_perplexity | eval_label_accuracy")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| 0.01", "| 0.3"]

    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [row["training.learning_rate"] for row in rows] == [0.01, 0.3]
    assert rows[0]["train_loss"] != rows[1]["train_loss"]  # the points really differ
    for row in rows:
        folder = tmp_path / "out" / f"learning_rate={row['training.learning_rate']}"
        assert row["output_dir"] == str(folder)
        assert (folder / "adapter_model.safetensors").is_file()
        assert json.loads((folder / "recipe.json").read_text())["training"]["learning_rate"] == row[
            "training.learning_rate"]


def test_format_table_skips_timings():
    rows = [{"training.seed": 1, "train_loss": 1.23456, "eval_runtime": 3.0, "eval_rouge1": float("nan")}]
    assert format_table(rows, ["training.seed"]).splitlines() == [
        "| seed | train_loss | eval_rouge1 |", "|---|---|---|", "| 1 | 1.235 | nan |"]


def test_bad_grid_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "tiny", "--grid", "training.learning_rat=1,2"])
    assert info.value.code == 2
    assert "did you mean 'training.learning_rate'?" in capsys.readouterr().err
