"""CLI: exit 0 on success, 2 with one message (no traceback) on bad input."""

import json
import math
import subprocess
import sys

import pytest

from ia3_trainer.cli.main import main

from conftest import tiny_recipe


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

    # A later run with a bad column fails before training and leaves the earlier adapter alone, --overwrite or not.
    with pytest.raises(SystemExit) as info:
        main(["train", path, "--overwrite", "--set", "data.text_column=text"])
    assert info.value.code == 2
    assert "data.text_column: no column 'text' in split 'train'" in capsys.readouterr().err
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_console_entry_point_runs_without_a_traceback(tmp_path):
    missing = tmp_path / "missing.json"
    result = subprocess.run([sys.executable, "-m", "ia3_trainer", "validate", str(missing)], capture_output=True,
                            text=True, cwd=tmp_path)
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


def test_validate_builds_no_trainer_callback_or_model(tmp_path, monkeypatch, capsys):
    import peft
    import transformers

    from ia3_trainer.hub.callback import PushAdapterToHubCallback
    from ia3_trainer.training.trainer import IA3Seq2SeqTrainer

    def refuse(self, *args, **kwargs):  # not a ValueError/TypeError, which validate or the CLI would turn into a line
        raise AssertionError(f"validate built a {type(self).__name__}")

    for cls in (PushAdapterToHubCallback, IA3Seq2SeqTrainer, transformers.Trainer, transformers.PreTrainedModel,
                peft.PeftModel):
        monkeypatch.setattr(cls, "__init__", refuse)
    path = write(tmp_path, tiny_recipe(tmp_path, **{"hub.repo_id": "alice/tiny-ia3", "hub.strategy": "epoch"}))
    assert main(["validate", path]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Recipe OK: tiny")
    # ... and the repo id is still checked, by the hub section itself.
    with pytest.raises(SystemExit) as info:
        main(["validate", path, "--set", "hub.repo_id=no-namespace"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("ia3-trainer: error: --set: hub.repo_id: 'no-namespace' has no namespace; use "
                                       "'user/name', e.g. 'alice/no-namespace'\n")


def test_validate_leaves_what_transformers_checks_itself_to_train(tmp_path, capsys):
    # validate imports no transformers (test_quiet.py); train builds the arguments before anything loads or is written.
    raw = tiny_recipe(tmp_path, **{"training.eval_strategy": "epoch", "training.save_strategy": "steps",
                                   "training.load_best_model_at_end": True})
    path = write(tmp_path, raw)
    assert main(["validate", path]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["train", path])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ia3-trainer: error: {path}: training: --load_best_model_at_end requires the save and eval "
                          "strategy to match"), err
    assert not (tmp_path / "out").exists()


def test_problems_are_blamed_on_the_file_or_on_set(tmp_path, capsys):
    path = write(tmp_path, tiny_recipe(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["validate", path, "--set", "training.learning_rate=abc"])
    assert info.value.code == 2
    expected = 'ia3-trainer: error: --set: training.learning_rate: expected a number, got str "abc"\n'
    assert capsys.readouterr().err == expected
    path = write(tmp_path, tiny_recipe(tmp_path, **{"training.learning_rate": "abc"}))
    with pytest.raises(SystemExit) as info:
        main(["validate", path, "--set", "training.seed=3"])
    assert info.value.code == 2
    assert capsys.readouterr().err == expected.replace("--set:", f"{path}:")


def test_set_resolves_dot_slash_only_in_path_fields(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "tiny", "--set", "data.source_prefix=./", "--set", "training.output_dir=./runs"]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out[: out.rindex("Recipe OK")])
    assert resolved["data"]["source_prefix"] == "./"
    assert resolved["training"]["output_dir"] == str(tmp_path / "runs")


# Values that validate used to accept and training then crashed on (a traceback after the model loaded), or ran for
# ever with; each is now one line from validate, naming the key.
BAD_VALUES = [
    ("training.learning_rate", -1, "must be > 0, got -1"),
    ("training.learning_rate", 0, "must be > 0, got 0"),
    ("training.num_train_epochs", 1e308, "must be in (0, 1,000,000], got 1e+308; for longer runs set max_steps"),
    ("training.num_train_epochs", -1, "must be in (0, 1,000,000], got -1; for longer runs set max_steps"),
    ("training.max_steps", 0, "must be -1 (train for num_train_epochs) or >= 1, got 0"),
    ("training.max_steps", 10**30, "must fit in 64 bits, got 1000000000000000000000000000000"),
    ("training.per_device_train_batch_size", 0, "must be >= 1, got 0"),
    ("training.per_device_train_batch_size", 2**63, "must fit in 64 bits, got 9223372036854775808"),
    ("training.per_device_eval_batch_size", -1, "must be >= 1, got -1"),
    ("training.gradient_accumulation_steps", 0, "must be >= 1, got 0"),
    ("training.eval_accumulation_steps", 0, "must be >= 1, got 0"),
    ("training.weight_decay", "raw:1e400", "non-finite number 1e400"),  # Python reads it as inf
    ("training.weight_decay", -1, "must be >= 0, got -1"),
    ("training.max_grad_norm", -1, "must be >= 0 (0 turns clipping off), got -1"),
    ("training.warmup_steps", math.inf, "non-finite number Infinity"),
    ("training.logging_steps", -math.inf, "non-finite number -Infinity"),
    ("training.logging_steps", -1, "must be > 0 (a number < 1 is a fraction of the steps), got -1"),
    ("training.save_steps", 0, "must be > 0 (a number < 1 is a fraction of the steps), got 0"),
    ("training.adam_beta1", 1.5, "must be in [0, 1), got 1.5"),
    ("training.adam_beta2", -1, "must be in [0, 1), got -1"),
    ("training.adam_epsilon", -1, "must be >= 0, got -1"),
    ("training.label_smoothing_factor", 1, "must be in [0, 1), got 1"),
    ("training.seed", -1, "must be in [0, 2**32 - 1], got -1"),
    ("training.seed", 2**32, "must be in [0, 2**32 - 1], got 4294967296"),
    ("training.data_seed", -(2**63) - 1, "must fit in 64 bits, got -9223372036854775809"),
    ("training.dataloader_num_workers", -1, "must be in [0, 1024], got -1"),
    ("training.generation_num_beams", 0, "must be >= 1, got 0"),
    ("training.generation_max_length", 10**9, "must be in [1, 1,000,000], got 1000000000"),
    ("data.max_source_length", 10**30, "must be in [1, 1,000,000], got 1000000000000000000000000000000"),
    ("data.max_target_length", 0, "must be in [1, 1,000,000], got 0"),
    ("data.split_seed", -1, "must be in [0, 2**32 - 1], got -1"),
    ("data.validation_size", math.nan, "non-finite number NaN"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=lambda v: str(v)[:24])
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, key, value, message):
    path = tmp_path / "recipe.json"
    text = json.dumps(tiny_recipe(tmp_path, **{key: value}), allow_nan=True)
    path.write_text(text.replace(f'"{value}"', value[4:]) if str(value).startswith("raw:") else text)
    for command in ("validate", "train"):
        with pytest.raises(SystemExit) as info:
            main([command, str(path)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        where = f"{path}: " if message.startswith("non-finite") else f"{path}: {key}: "
        assert err == f"ia3-trainer: error: {where}{message}" + ("; JSON has none: write a number or null\n"
                                                                   if message.startswith("non-finite") else "\n")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_package_errors_are_one_redacted_line_in_the_flags_words(tmp_path, capsys, monkeypatch):
    import ia3_trainer.cli.main as cli
    from ia3_trainer import errors

    token = "hf_" + "Q" * 34
    monkeypatch.setenv("HF_TOKEN", token)

    def fail(error):
        def run(*args, **kwargs):
            raise error
        return run

    for error in (errors.DataError(f"data.path: bad value echoing {token}"),
                  errors.HubError("could not push: Authorization: Bearer abcdefgh1"),
                  errors.RunFolderError(key="training.output_dir", problem="cannot write: No space left on device"),
                  errors.MissingPackageError("the rouge metric needs rouge_score")):
        monkeypatch.setattr(cli, "train_command", fail(error))
        with pytest.raises(SystemExit) as info:
            main(["train", "tiny", "--set", f"training.output_dir={tmp_path / 'out'}"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ia3-trainer: error: ") and token not in err
    assert err == "ia3-trainer: error: the rouge metric needs rouge_score\n"
    # What a Python caller is told by argument (overwrite=True, merged_dir), the command line says by its flags.
    said = errors.PathError(key="merged_dir", problem="m is not empty", fix="pass overwrite=True to replace it")
    assert str(said) == "merged_dir: m is not empty; pass overwrite=True to replace it"
    monkeypatch.setattr(cli, "train_command", fail(said))
    with pytest.raises(SystemExit):
        main(["train", "tiny", "--set", f"training.output_dir={tmp_path / 'out'}"])
    said = "ia3-trainer: error: MERGED_DIR: m is not empty; pass --overwrite to replace it\n"
    assert capsys.readouterr().err == said

    monkeypatch.setenv("IA3_TRAINER_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(errors.PathError, match="merged_dir: m is not empty"):
        main(["train", "tiny", "--set", f"training.output_dir={tmp_path / 'out'}"])
    monkeypatch.delenv("IA3_TRAINER_DEBUG")
    with pytest.raises(SystemExit) as info:  # argparse's own messages quote what was typed
        main(["predict", "x", "--batch-size", token])
    assert info.value.code == 2 and token not in capsys.readouterr().err


def test_a_bug_is_a_traceback_and_how_to_report_it_not_a_bad_input_line(tmp_path, capsys, monkeypatch):
    from ia3_trainer.recipe.loading import Recipe

    token = "hf_" + "R" * 34
    monkeypatch.setenv("HF_TOKEN", token)
    for bug in (ZeroDivisionError("division by zero"), ValueError(f"a library's own ValueError echoing {token}"),
                OSError(5, "Input/output error"), TypeError("to_dict() got an unexpected keyword argument")):
        def broken(self, *args, bug=bug, **kwargs):  # one of the package's own functions, broken
            raise bug

        monkeypatch.setattr(Recipe, "to_dict", broken)
        assert main(["validate", "tiny"]) == 1
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert lines[0] == "Traceback (most recent call last):" and "in broken" in err
        assert f"{type(bug).__name__}: " in lines[-2] and "ia3-trainer: error:" not in err and token not in err
        assert lines[-1].startswith(f"ia3-trainer: internal error ({type(bug).__name__}); this is a bug")
        assert lines[-1].endswith("please report it with the traceback above at "
                                  "https://github.com/ia3-trainer/ia3-trainer/issues")


@pytest.mark.parametrize("argv", [
    ["validate", "no-such-recipe"],
    ["validate", "{folder}/bad.json"],
    ["validate", "tiny", "--set", "training.learning_rate"],
    ["validate", "tiny", "--set", "eval.metrics=[\"no-such-metric\"]"],
    ["train", "tiny", "--set", "training.output_dir={folder}/taken"],
    ["train", "tiny", "--resume", "--set", "training.output_dir={folder}/new"],
    ["predict", "{folder}", "  "],
    ["predict", "{folder}", "--file", "{folder}/none.txt"],
    ["evaluate", "{folder}/no-adapter"],
    ["merge", "{folder}/no-adapter", "{folder}/merged"],
    ["init", "--data", "{folder}/none.csv"],
    ["init", "--data", "{folder}/bad.json", "--label-separator", "@"],
    ["push", "{folder}", "not a repo id"],
    ["push", "{folder}", "user/name"],
], ids=lambda argv: " ".join(argv[:2]))
def test_every_one_line_error_is_an_ia3_trainer_error(tmp_path, monkeypatch, capsys, argv):
    import ia3_trainer

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    argv = [part.replace("{folder}", str(tmp_path)) for part in argv]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ia3-trainer: error: ") and "Traceback" not in err
    monkeypatch.setenv("IA3_TRAINER_DEBUG", "1")  # the same input raises what the line was made from
    with pytest.raises(ia3_trainer.IA3TrainerError):
        main(argv)


def test_evaluate_and_push_validate_the_saved_recipe_first(tmp_path, capsys):
    import ia3_trainer

    folder = tmp_path / "run"
    ia3_trainer.load_recipe("tiny").save(folder)
    saved = json.loads((folder / "recipe.json").read_text())
    saved["data"]["load_kwargs"] = {"token": "hf_" + "S" * 34, "cache_dir": str(tmp_path / "cache")}
    (folder / "recipe.json").write_text(json.dumps(saved))
    (folder / "adapter_config.json").write_text("{}")
    before = sorted(p.name for p in folder.iterdir())
    for argv in (["evaluate", str(folder)], ["push", str(folder), "alice/tiny-ia3"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ia3-trainer: error: {folder / 'recipe.json'}: data.load_kwargs.token: not allowed")
        assert "S" * 34 not in err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing loaded, nothing written
    assert not (tmp_path / "cache").exists()


def test_unreadable_predict_file_is_one_line_before_any_model_loads(tmp_path, capsys):
    latin = tmp_path / "texts.txt"
    latin.write_bytes("caf\xe9 prices rose\n".encode("latin-1"))
    deep = tmp_path / "texts.jsonl"
    deep.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")
    for path, message in ((latin, f"--file: {latin}: not UTF-8 text (byte 3); save it as UTF-8"),
                          (deep, f"{deep}: line 2: not JSON (maximum recursion depth exceeded")):
        with pytest.raises(SystemExit) as info:
            main(["predict", str(tmp_path / "no-adapter-here"), "--file", str(path)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ia3-trainer: error: {message}") and err.count("\n") == 1


def test_a_log_file_gets_lines_not_progress_bars(tmp_path):
    """With stderr redirected to a file, no progress bar writes its carriage-return redraws there (training,
    evaluation, datasets' map, loading); the trainer's logs still come as lines on stdout."""
    path = write(tmp_path, tiny_recipe(tmp_path, **{"training.max_steps": 4, "training.eval_strategy": "steps",
                                                    "training.eval_steps": 2}))
    with open(tmp_path / "stdout.log", "wb") as out, open(tmp_path / "stderr.log", "wb") as err:
        result = subprocess.run([sys.executable, "-m", "ia3_trainer", "train", path], stdout=out, stderr=err,
                                cwd=tmp_path, timeout=300)
    stdout, stderr = (tmp_path / "stdout.log").read_bytes(), (tmp_path / "stderr.log").read_bytes()
    assert result.returncode == 0, stderr[-2000:]
    assert b"\r" not in stderr and b"\r" not in stdout
    assert stdout.count(b"'loss':") == 4 and stdout.count(b"'eval_loss':") == 2  # logged as lines instead
