"""CLI: exit 0 on success, 2 with one message (no traceback) on bad input."""

import json
import subprocess
import sys

import pytest

from ia3_trainer.cli import main

from conftest import REPO, tiny_recipe


def write(tmp_path, raw, name="recipe.json"):
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return str(path)


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "train" in capsys.readouterr().out


def test_validate_prints_the_resolved_recipe(capsys):
    assert main(["validate", "phrasebank", "--set", "training.learning_rate=1e-2"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("Recipe OK: phrasebank-mt0-large-ia3")
    resolved = json.loads(out[: out.rindex("Recipe OK")])
    assert resolved["training"]["learning_rate"] == 0.01


def test_list_shows_shipped_recipes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tiny " in out and "phrasebank " in out


def test_bad_recipe_exits_2_with_its_message(tmp_path, capsys):
    raw = tiny_recipe(tmp_path)
    raw["training"]["learning_rat"] = 1
    path = write(tmp_path, raw)
    with pytest.raises(SystemExit) as info:
        main(["validate", path])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"ia3-trainer: error: {path}: training.learning_rat: unknown key; did you mean "
                   "'training.learning_rate'?\n")


def test_bad_override_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "tiny", "--set", "trainig.learning_rate=1"])
    assert info.value.code == 2
    assert "trainig.learning_rate: unknown section; did you mean 'training'?" in capsys.readouterr().err


def test_train_then_data_error_exit_codes(tmp_path, capsys):
    path = write(tmp_path, tiny_recipe(tmp_path, **{"training.max_steps": 2, "training.eval_strategy": "no"}))
    assert main(["train", path]) == 0
    out = capsys.readouterr().out
    assert "train_loss=" in out and "eval_perplexity=" in out and "eval_label_accuracy=" in out
    output_dir = tmp_path / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.json",
                 "all_results.json"):
        assert (output_dir / name).is_file(), name

    # A later run with a bad column fails before training and leaves the earlier adapter alone.
    with pytest.raises(SystemExit) as info:
        main(["train", path, "--set", "data.text_column=text"])
    assert info.value.code == 2
    assert "data.text_column: no column 'text' in split 'train'" in capsys.readouterr().err
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_console_entry_point_runs_without_a_traceback(tmp_path):
    missing = tmp_path / "missing.json"
    result = subprocess.run([sys.executable, "-m", "ia3_trainer", "validate", str(missing)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith(f"ia3-trainer: error: {missing}: no such recipe file or shipped recipe")
    assert "Traceback" not in result.stderr


def test_train_reuses_the_evaluation_made_at_the_last_step(tmp_path, capsys):
    path = write(tmp_path, tiny_recipe(tmp_path, **{"training.max_steps": -1, "training.num_train_epochs": 2,
                                                    "training.eval_strategy": "epoch"}))
    assert main(["train", path]) == 0
    out = tmp_path / "out"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert len(evaluations) == 2  # one an epoch: the summary did not evaluate a third time
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_label_accuracy"] == evaluations[-1]["eval_label_accuracy"]
    assert results["eval_perplexity"] == evaluations[-1]["eval_perplexity"]
