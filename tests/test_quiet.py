"""What a newcomer sees: `ia3-trainer train` prints no warning a user cannot act on, and the commands that load no
model start without importing torch."""

import json
import subprocess
import sys
import warnings

from ia3_trainer.cli.main import main

from conftest import TINY_ASSETS, tiny_recipe


def test_training_the_tiny_recipe_warns_about_nothing(tmp_path, capsys):
    # The shipped data and split (its duplicate check sees the whole validation split), checkpoints saved within a
    # second of each other and rotated, an evaluation and the final save of the random base model.
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 3, "training.eval_strategy": "steps",
                                   "training.eval_steps": 3, "training.save_strategy": "steps",
                                   "training.save_steps": 1, "training.save_total_limit": 2,
                                   "data.max_train_samples": None, "data.max_eval_samples": None})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(path)]) == 0
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]  # hidden by Python
    assert shown == []
    err = capsys.readouterr().err
    assert "warn" not in err.lower() and "same text as a training example" not in err, err
    assert not [line for line in err.splitlines() if line.startswith("[transformers]")], err
    assert "Writing model shards" not in err


def test_the_shipped_tiny_data_has_no_duplicate_text():
    lines = (TINY_ASSETS / "tiny-sentiment.jsonl").read_text().splitlines()
    sentences = [json.loads(line)["sentence"] for line in lines]
    assert len(sentences) == 600 == len(set(sentences))


def test_commands_that_load_no_model_import_no_torch(tmp_path):
    # Help, the list, `validate` (it leaves out the checks transformers makes itself: `train` makes them) and every
    # problem of a recipe or an override answer at once: importing torch and transformers takes seconds.
    (tmp_path / "broken.json").write_text('{"name": "broken",')
    script = (
        "import sys\n"
        "from ia3_trainer.cli.main import main\n"
        "for argv in (['--help'], ['train', '--help'], ['list'], ['train', 'missing.json'], ['validate', 'tiny'],\n"
        "             ['validate', 'broken.json'], ['train', 'tiny', '--set', 'training.seed'],\n"
        "             ['validate', 'tiny', '--set', 'training.learning_rate=-1'],\n"
        "             ['validate', 'tiny', '--set', 'training.learnin_rate=1e-2'],\n"
        "             ['train', 'tiny', '--set', 'ia3.target_modules=[]']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-2:] == ["Recipe OK: tiny", "[]"], result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("ia3-trainer: error: ") == 6, result.stderr
    assert "--set: training.learning_rate: must be > 0, got -1" in result.stderr
    assert "--set: training.learnin_rate: unknown key; did you mean 'training.learning_rate'?" in result.stderr
    assert "--set: ia3.target_modules: is empty" in result.stderr
