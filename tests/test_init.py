"""ia3-trainer init: a starter recipe read off a local data file; what it writes validates and trains."""

import csv
import dataclasses
import json
import shutil

import pytest

from ia3_trainer import IA3Seq2SeqTrainer, load_recipe
from ia3_trainer.cli.main import main
from ia3_trainer.evaluation.metrics import label_accuracy

from conftest import TINY_ASSETS, TINY_MODEL_DIR, generate_one_by_one


def test_init_writes_a_recipe_that_validates_and_trains(tmp_path, tiny_t5_dir, capsys):
    shutil.copy(TINY_ASSETS / "tiny-sentiment.jsonl", tmp_path / "reviews.jsonl")
    output = tmp_path / "reviews-ia3.json"
    assert main(["init", "--data", str(tmp_path / "reviews.jsonl"), "--model", str(tiny_t5_dir),
                 "-o", str(output)]) == 0
    out = capsys.readouterr().out
    assert f"Wrote {output}" in out and "classification with 3 labels: negative, neutral, positive" in out
    assert f"Next: ia3-trainer validate {output} && ia3-trainer train {output}" in out

    raw = json.loads(output.read_text())
    assert raw["data"]["data_files"] == {"train": "./reviews.jsonl"}  # next to the recipe: recipe-relative
    assert raw["data"]["label_names"] == ["negative", "neutral", "positive"]
    assert raw["data"]["max_target_length"] == 2  # measured: one label token + EOS
    assert raw["model"]["name_or_path"] == str(tiny_t5_dir)
    assert "ia3-trainer train reviews-ia3.json" in raw["description"]
    assert main(["validate", str(output)]) == 0

    trainer = IA3Seq2SeqTrainer.from_recipe(output, {
        "training.output_dir": str(tmp_path / "out"), "training.max_steps": 2, "training.eval_strategy": "no",
        "training.save_strategy": "no", "training.use_cpu": True, "data.max_train_samples": 32})
    assert trainer.train().global_step == 2
    predictions, references = generate_one_by_one(trainer)
    assert trainer.evaluate()["eval_label_accuracy"] == pytest.approx(label_accuracy(predictions, references))


def test_integer_labels_and_free_text_targets(tmp_path, capsys):
    with open(tmp_path / "ints.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *[[f"sentence {i}", i % 2] for i in range(20)]])
    assert main(["init", "--data", str(tmp_path / "ints.csv"), "--text-column", "text",
                 "--model", str(TINY_MODEL_DIR), "-o", str(tmp_path / "ints.json")]) == 0
    assert "rename them to words" in capsys.readouterr().out
    recipe = load_recipe(tmp_path / "ints.json")
    assert recipe.data.label_names == ["0", "1"] and recipe.data.path == "csv"

    rows = [{"dialogue": f"A: meeting {i}? B: at {i} pm.", "summary": f"They meet at {i} pm."} for i in range(30)]
    (tmp_path / "talks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["init", "--data", str(tmp_path / "talks.jsonl"), "--text-column", "dialogue", "--label-column",
                 "summary", "--model", "no-such-org/no-such-model", "-o", str(tmp_path / "talks.json")]) == 0
    out = capsys.readouterr().out
    assert "free-text generation" in out and "not available offline" in out
    recipe = load_recipe(tmp_path / "talks.json")
    assert recipe.data.label_names is None and recipe.data.max_target_length == 128
    assert recipe.eval.metrics == ["perplexity", "rouge"]


@pytest.mark.parametrize("argv, message", [
    (["--label-column", "lable"], "--label-column: no column 'lable' in tiny-sentiment.jsonl; did you mean 'label'?"),
    (["--text-column", "text"], "--text-column: no column 'text'"),
])
def test_bad_columns_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["init", "--data", str(TINY_ASSETS / "tiny-sentiment.jsonl"), "-o", str(tmp_path / "r.json"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", "", "--data: empty.csv is empty; write one example a line, after a header line naming the columns"),
    ("blank.jsonl", "\n\n", "--data: blank.jsonl is empty; write one example a line"),
    ("header.csv", "text,label\n", "--data: header.csv has no examples, only a header line; write one example a line"),
])
def test_a_file_without_examples_says_so(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SystemExit) as info:
        main(["init", "--data", str(tmp_path / name), "-o", str(tmp_path / "r.json")])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"ia3-trainer: error: {message}\n"


def test_does_not_overwrite_without_force(tmp_path, capsys):
    output = tmp_path / "r.json"
    output.write_text('{"model": {"name_or_path": "t5-small"}, "data": {"path": "json"}}')  # an earlier recipe
    args = ["init", "--data", str(TINY_ASSETS / "tiny-sentiment.jsonl"), "--model", str(TINY_MODEL_DIR),
            "-o", str(output)]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "exists; choose another file or pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert load_recipe(output).data.label_names == ["negative", "neutral", "positive"]


def test_force_replaces_the_file_only_with_a_recipe_that_validates(tmp_path, capsys, monkeypatch):
    # Run from tmp_path, the starter's training.output_dir (outputs/r) is the recipe file's own folder, which
    # validation refuses: the file that --force would replace must be left as it was (it used to be replaced first).
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "outputs" / "r" / "r.json"
    output.parent.mkdir(parents=True)
    output.write_text('{"name": "my", "model": {}, "data": {}}\n')
    with pytest.raises(SystemExit) as info:
        main(["init", "--data", str(TINY_ASSETS / "tiny-sentiment.jsonl"), "--model", str(TINY_MODEL_DIR),
              "-o", "outputs/r/r.json", "--force"])
    assert info.value.code == 2
    assert "training.output_dir: " in capsys.readouterr().err
    assert output.read_text() == '{"name": "my", "model": {}, "data": {}}\n'
    assert sorted(path.name for path in output.parent.iterdir()) == ["r.json"]


def test_init_reads_text_lines_with_a_label_separator(tmp_path, capsys):
    """The format the phrasebank recipe reads: `sentence@label` lines, in latin-1."""
    lines = tmp_path / "lines.txt"
    rows = [("Caf\xe9 sales rose 5 % @ Espoo", "positive"), ("Profit fell", "negative"), ("It is Monday", "neutral")]
    lines.write_bytes("".join(f"{text}@{label}\n" for text, label in rows * 4).encode("latin-1"))
    output = tmp_path / "lines.json"
    args = ["init", "--data", str(lines), "--model", str(TINY_MODEL_DIR), "-o", str(output)]
    with pytest.raises(SystemExit):
        main(args)
    assert "--data: lines.txt is not UTF-8 text" in capsys.readouterr().err
    assert main([*args, "--encoding", "latin-1"]) == 0
    assert "each line is text@label, split at its last '@'" in capsys.readouterr().out
    recipe = load_recipe(output)
    assert (recipe.data.path, recipe.data.label_separator, recipe.data.load_kwargs) == ("text", "@",
                                                                                      {"encoding": "latin-1"})
    assert recipe.data.label_names == ["negative", "neutral", "positive"]
    from ia3_trainer.data.splits import load_splits

    train, _ = load_splits(dataclasses.replace(recipe.data, validation_size=0))
    assert list(zip(train["sentence"], train["label"], strict=True))[:3] == rows  # split at the last @

    with pytest.raises(SystemExit):  # a separator is for .txt lines only
        main(["init", "--data", str(TINY_ASSETS / "tiny-sentiment.jsonl"), "--label-separator", "@",
              "-o", str(tmp_path / "r.json")])
    assert "--label-separator: only for .txt files" in capsys.readouterr().err


def test_force_never_replaces_an_input_or_a_model_file(tmp_path, tiny_t5_dir, capsys):
    data = tmp_path / "d.jsonl"
    shutil.copy(TINY_ASSETS / "tiny-sentiment.jsonl", data)
    model = tmp_path / "model"
    shutil.copytree(tiny_t5_dir, model)
    (tmp_path / "link.json").symlink_to(data)
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}\n')
    files = [data, model / "config.json", model / "tokenizer_config.json", notes]
    before = {path: path.read_bytes() for path in files}
    for output, message in [
        (data, f"--output: {data} is the data file --data reads; write the recipe to another file"),
        (tmp_path / "link.json", "is the data file --data reads"),
        (model / "config.json", f"--output: {model / 'config.json'} is in a model or adapter folder (it holds "
                                "config.json); --force replaces only a recipe of yours"),
        (model / "tokenizer_config.json", "is in a model or adapter folder"),
        (notes, f"--output: {notes} exists and is not a recipe (--force replaces only a recipe written before, never "
                "a data or model file); choose another file"),
        (model, f"--output: {model} is a folder; give the recipe file to write"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["init", "--data", str(data), "--model", str(tiny_t5_dir), "-o", str(output), "--force"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert {path: path.read_bytes() for path in files} == before
