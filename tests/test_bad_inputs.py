"""Bad files and arguments, each one line from the CLI (`ia3-trainer: error: ...`, exit 2, no traceback): data that
is not UTF-8, label columns Arrow cannot compare, damaged adapter folders, bad counts, an --output that cannot be
written; and `evaluate --data` on a csv for an adapter trained from `text<SEP>label` lines (issue 11)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from ia3_trainer import IA3Seq2SeqTrainer
from ia3_trainer.cli.main import main
from ia3_trainer.inference.predictor import IA3Predictor

from conftest import TINY_ASSETS, tiny_recipe


ROWS = [json.loads(line) for line in (TINY_ASSETS / "tiny-sentiment.jsonl").read_text().splitlines()]


def one_line_error(argv: list[str], capsys, expected) -> None:
    """`main(argv)` exits 2 with one `ia3-trainer: error:` line holding each of `expected`, and no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2, captured
    assert captured.err.startswith("ia3-trainer: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and all(part in captured.err for part in expected), captured.err


@pytest.fixture(autouse=True)
def one_line_errors_are_package_errors(monkeypatch):
    """Every `ia3-trainer: error:` line of these tests was made from an IA3TrainerError (anything else would be a
    bug, shown with its traceback)."""
    import sys

    import ia3_trainer.cli.main as cli
    from ia3_trainer import IA3TrainerError

    said = []
    exit_ = cli._Parser.exit

    def exit(self, status=0, message=None):
        if message and message.startswith("ia3-trainer: error:"):
            said.append(sys.exc_info()[1])  # the exception being handled when the line is printed
        return exit_(self, status, message)

    monkeypatch.setattr(cli._Parser, "exit", exit, raising=False)
    yield
    assert all(isinstance(error, IA3TrainerError) for error in said), said


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_t5_dir):
    """A tiny adapter trained from `text@label` lines, as both phrasebank recipes read their data."""
    folder = tmp_path_factory.mktemp("lines")
    lines = folder / "lines.txt"
    lines.write_text("".join(f"{row['sentence']}@{row['label']}\n" for row in ROWS))
    raw = tiny_recipe(folder, **{
        "model.name_or_path": str(tiny_t5_dir), "model.init": "pretrained", "training.max_steps": 2,
        "data.path": "text", "data.data_files": {"train": str(lines)}, "data.label_separator": "@",
    })
    IA3Seq2SeqTrainer.from_recipe(raw).train()
    return folder / "out"


def write_rows(path, rows, encoding="utf-8"):
    if path.suffix == ".csv":
        text = "sentence,label\n" + "".join(f"{row['sentence'].replace(',', ' ')},{row['label']}\n" for row in rows)
    else:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(text.encode(encoding))
    return path


def latin1(path):
    """The tiny data with one accented word, saved as latin-1 (what Financial PhraseBank ships in)."""
    return write_rows(path, [{**ROWS[0], "sentence": "Caf\xe9 sales rose"}, *ROWS[1:8]], encoding="latin-1")


def recipe_for(tmp_path, data_file, **fields):
    path = "csv" if data_file.suffix == ".csv" else "json"
    raw = tiny_recipe(tmp_path, **{"data.path": path, "data.data_files": {"train": str(data_file)}, **fields})
    (tmp_path / "recipe.json").write_text(json.dumps(raw))
    return str(tmp_path / "recipe.json")


def damaged(adapter, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(adapter, folder)
    damage(folder)
    return str(folder)


def no_tensors() -> bytes:
    """A whole safetensors file that holds metadata only."""
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    return len(header).to_bytes(8, "little") + header


def half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CASES = {
    # name: (argv builder (tmp_path, adapter) -> argv, part of the one line, fails before any model loads)
    "train-latin1-csv": (lambda t, a: ["train", recipe_for(t, latin1(t / "d.csv"))], "is not UTF-8 text"),
    "train-latin1-jsonl": (lambda t, a: ["train", recipe_for(t, latin1(t / "d.jsonl"))], "is not UTF-8 text"),
    "evaluate-latin1-csv": (lambda t, a: ["evaluate", str(a), "--data", str(latin1(t / "d.csv")), "--output-dir",
                                          str(t / "report")], "is not UTF-8 text"),
    "init-latin1-csv": (lambda t, a: ["init", "--data", str(latin1(t / "d.csv")), "-o", str(t / "r.json")],
                        "--data: d.csv is not UTF-8 text"),
    "init-unknown-encoding-txt": (lambda t, a: ["init", "--data", str(latin1(t / "d.txt")), "--encoding", "latin-9x",
                                                "-o", str(t / "r.json")],
                                  "--encoding: unknown text encoding 'latin-9x'"),
    "init-unknown-encoding-csv": (lambda t, a: ["init", "--data", str(latin1(t / "d.csv")), "--encoding", "latin-9x",
                                                "-o", str(t / "r.json")],
                                  "--encoding: unknown text encoding 'latin-9x'"),
    "init-codec-not-of-text": (lambda t, a: ["init", "--data", str(latin1(t / "d.csv")), "--encoding", "rot13",
                                             "-o", str(t / "r.json")], "--encoding: unknown text encoding 'rot13'"),
    "predict-file-latin1": (lambda t, a: ["predict", str(a), "--file", str(latin1(t / "d.txt"))],
                            "--file: ", "not UTF-8 text"),
    "train-mixed-labels": (
        lambda t, a: ["train", recipe_for(t, write_rows(t / "d.jsonl", [*ROWS[:8], {"sentence": "x", "label": 2}]),
                                          **{"data.label_names": None})],
        "data.label_column: column 'label' of split 'train' holds values of mixed types"),
    "train-list-labels": (
        lambda t, a: ["train", recipe_for(t, write_rows(t / "d.jsonl", [{**row, "label": [row["label"]]}
                                                                          for row in ROWS[:8]]))],
        "data.label_column: column 'label' of split 'train' holds List values"),
    "init-mixed-labels": (
        lambda t, a: ["init", "--data", str(write_rows(t / "d.jsonl", [*ROWS[:8], {"sentence": "x", "label": 2}])),
                      "-o", str(t / "r.json")],
        "--label-column: column 'label' of d.jsonl holds values of mixed types"),
    "train-folder-as-data-file": (lambda t, a: ["train", recipe_for(t, t)], "data.data_files: ", "is a folder"),
    "evaluate-data-unknown-suffix": (lambda t, a: ["evaluate", str(a), "--data", str(touch(t / "d.xlsx"))],
                                     "--data: d.xlsx: cannot read .xlsx files; use a .csv, .tsv, .json, .jsonl, "
                                     ".parquet, .txt file"),
    "init-data-unknown-suffix": (lambda t, a: ["init", "--data", str(touch(t / "d.xlsx")), "-o", str(t / "r.json")],
                                 "--data: d.xlsx: cannot read .xlsx files; use a .csv"),
    "evaluate-folder-as-data": (lambda t, a: ["evaluate", str(a), "--data", str(t)], "is a folder"),
    "predict-file-folder": (lambda t, a: ["predict", str(a), "--file", str(t)], "--file: ", "is a folder"),
    "init-folder-as-data": (lambda t, a: ["init", "--data", str(t / "x.csv"), "-o", str(t / "r.json")],
                            "is a folder"),
    "weights-truncated": (lambda t, a: ["predict", damaged(a, t, lambda f: half(f / "adapter_model.safetensors")),
                                        "text"], "not a whole safetensors file"),
    "weights-empty": (lambda t, a: ["predict", damaged(a, t, lambda f: (f / "adapter_model.safetensors")
                                                       .write_bytes(b"")), "text"], "not a whole safetensors file"),
    "weights-random": (lambda t, a: ["evaluate", damaged(a, t, lambda f: (f / "adapter_model.safetensors")
                                                         .write_bytes(os.urandom(4096)))],
                       "not a whole safetensors file"),
    "weights-no-tensors": (lambda t, a: ["predict", damaged(a, t, lambda f: (f / "adapter_model.safetensors")
                                                           .write_bytes(no_tensors())), "text"],
                           "adapter_model.safetensors: holds no tensors"),
    "weights-missing": (lambda t, a: ["merge", damaged(a, t, lambda f: (f / "adapter_model.safetensors").unlink()),
                                      str(t / "merged")], "holds adapter_config.json but no adapter weights"),
    "config-list": (lambda t, a: ["predict", damaged(a, t, lambda f: (f / "adapter_config.json").write_text("[]")),
                                  "text"], "adapter_config.json: must be a JSON object"),
    "config-empty": (lambda t, a: ["predict", damaged(a, t, lambda f: (f / "adapter_config.json").write_text("{}")),
                                   "text"], "peft_type: no peft_type"),
    "max-new-tokens-negative": (lambda t, a: ["predict", str(a), "text", "--max-new-tokens", "-3"],
                                "--max-new-tokens: must be >= 1, got -3"),
    "max-new-tokens-zero": (lambda t, a: ["predict", str(a), "text", "--max-new-tokens", "0"],
                            "--max-new-tokens: must be >= 1, got 0"),
    "output-in-missing-folder": (lambda t, a: ["predict", str(a), "text", "--output", str(t / "no" / "p.jsonl")],
                                 "--output: no folder"),
    "output-is-a-folder": (lambda t, a: ["predict", str(a), "text", "--output", str(t)], "is a folder"),
    "output-exists": (lambda t, a: ["predict", str(a), "text", "--output", str(touch(t / "mine.jsonl"))],
                      "mine.jsonl exists; choose another file or pass --overwrite to replace it"),
    "output-dir-holds-a-report": (lambda t, a: ["evaluate", str(a), "--output-dir", holding(t / "eval_report.json")],
                                  "holds eval_report.json already; pass --overwrite to replace them"),
    "output-dir-holds-a-plot": (lambda t, a: ["evaluate", str(a), "--output-dir", holding(t / "training_curves.png")],
                                "holds training_curves.png already; pass --overwrite"),
    "output-dir-is-a-file": (lambda t, a: ["evaluate", str(a), "--output-dir", str(touch(t / "r"))],
                             "--output-dir: ", "is a file"),
}


def touch(path):
    path.write_text("a user's own file\n")
    return path


def holding(path) -> str:
    """The folder of `path`, which now holds a file of that name."""
    return str(touch(path).parent)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name, adapter, tmp_path, capsys, monkeypatch):
    build, *expected = CASES[name]
    if name == "init-folder-as-data":
        (tmp_path / "x.csv").mkdir()
    argv = build(tmp_path, adapter)
    if name.startswith(("max-new-tokens", "output", "predict-file")):
        # Argument problems are found before the model loads, which can take minutes.
        monkeypatch.setattr(IA3Predictor, "from_pretrained", lambda *args, **kwargs: pytest.fail("model loaded"))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    one_line_error(argv, capsys, expected)
    if name.startswith("output"):  # nothing half-written, nothing replaced
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


# --- issue 19: inputs that ended in tracebacks ---------------------------------------------------------------------

def loop(path) -> str:
    """`path` made a symlink to itself: every stat of it fails with ELOOP."""
    os.symlink(path, path)
    return str(path)


def model_copy(tmp_path, base, damage) -> str:
    """A copy of the base model folder `base`, damaged by `damage(folder)`."""
    folder = tmp_path / "model"
    shutil.copytree(base, folder)
    damage(folder)
    return str(folder)


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def train_recipe(tmp_path, **fields) -> str:
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 1, **fields})
    (tmp_path / "r.json").write_text(json.dumps(raw))
    return str(tmp_path / "r.json")


def on_model(tmp_path, base, damage, **fields) -> str:
    return train_recipe(tmp_path, **{"model.name_or_path": model_copy(tmp_path, base, damage),
                                     "model.init": "pretrained", **fields})


def on_base(tmp_path, adapter, base, damage) -> str:
    """A copy of `adapter` whose adapter_config.json names a damaged copy of its base model."""
    model = model_copy(tmp_path, base, damage)
    return damaged(adapter, tmp_path, lambda f: edit_json(
        f / "adapter_config.json", lambda config: {**config, "base_model_name_or_path": model}))


def disk_full(monkeypatch):
    import errno

    from ia3_trainer import jsonfiles

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel says it: no path

    monkeypatch.setattr(jsonfiles, "write_bytes", full)


def not_json(path) -> str:
    path.write_text("{not json")
    return str(path)


TRACEBACK_CASES = {
    # name: (argv builder (tmp_path, adapter, base model folder, monkeypatch) -> argv, parts of the one line)
    "data-file-symlink-loop": (lambda t, a, b, mp: ["train", recipe_for(t, Path(loop(t / "loop.jsonl")))],
                               "data.data_files: ", "loop.jsonl is a symlink loop"),
    "output-dir-symlink-loop": (lambda t, a, b, mp: ["train", train_recipe(t, **{
        "training.output_dir": loop(t / "out")})], "training.output_dir: ", "out is a symlink loop"),
    "merge-target-symlink-loop": (lambda t, a, b, mp: ["merge", str(a), loop(t / "merged")],
                                  "MERGED_DIR: ", "merged is a symlink loop"),
    "inference-json-list": (lambda t, a, b, mp: ["predict", damaged(a, t, lambda f: (f / "inference.json")
                                                                    .write_text("[1]")), "text"],
                            "inference.json: must be a JSON object"),
    "inference-json-wrong-types": (lambda t, a, b, mp: ["predict", damaged(a, t, lambda f: edit_json(
        f / "inference.json", lambda i: {**i, "label_names": "positive"})), "text"],
        'inference.json: label_names: must be a list of label texts, got "positive"'),
    "inference-json-negative-bound": (lambda t, a, b, mp: ["predict", damaged(a, t, lambda f: edit_json(
        f / "inference.json", lambda i: {**i, "max_new_tokens": -5})), "text"],
        "inference.json: max_new_tokens: must be a whole number >= 1, got -5"),
    "adapter-config-target-modules-int": (lambda t, a, b, mp: ["predict", damaged(a, t, lambda f: edit_json(
        f / "adapter_config.json", lambda c: {**c, "target_modules": 5})), "text"],
        "adapter_config.json: target_modules: must be a module name or a list of module names, got 5"),
    "tokenizer-json-without-fields": (lambda t, a, b, mp: ["train", on_model(t, b, lambda f: (
        f / "tokenizer.json").write_text('{"version": "1.0"}'))],
        "model.name_or_path: cannot load a tokenizer from ", "KeyError"),
    "base-config-wrong-type": (lambda t, a, b, mp: ["train", on_model(t, b, lambda f: edit_json(
        f / "config.json", lambda c: {**c, "d_model": "big"}))], "model.name_or_path: cannot load ", "d_model"),
    "base-weights-truncated-train": (lambda t, a, b, mp: ["train", on_model(t, b, lambda f: half(
        f / "model.safetensors"))], "model.name_or_path: cannot load a seq2seq model from ", "damaged"),
    "base-weights-truncated-predict": (lambda t, a, b, mp: ["predict", on_base(t, a, b, lambda f: half(
        f / "model.safetensors")), "text"], "base_model_name_or_path: cannot load a seq2seq model from "),
    "base-weights-truncated-merge": (lambda t, a, b, mp: ["merge", on_base(t, a, b, lambda f: half(
        f / "model.safetensors")), str(t / "merged")], "base_model_name_or_path: cannot load a seq2seq model from "),
    "disk-full-at-start": (lambda t, a, b, mp: disk_full(mp) or ["train", train_recipe(t)],
                           "training.output_dir: cannot write ", "run.json (No space left on device)"),
    "launcher-variable-not-a-number": (lambda t, a, b, mp: mp.setenv("LOCAL_RANK", "abc") or [
        "train", train_recipe(t)], "ia3-trainer: error: LOCAL_RANK: the environment variable is 'abc'"),
    "accelerator-config-file-not-json": (lambda t, a, b, mp: [
        "train", train_recipe(t), "--set", f"training.accelerator_config={not_json(t / 'accelerate.json')}"],
        "ia3-trainer: error: --set: training.accelerator_config: ", "accelerate.json: invalid JSON"),
}


@pytest.mark.parametrize("name", list(TRACEBACK_CASES))
def test_input_that_ended_in_a_traceback_is_one_line(name, adapter, tiny_t5_dir, tmp_path, capsys, monkeypatch):
    from ia3_trainer.modeling import loading as modeling

    build, *expected = TRACEBACK_CASES[name]
    monkeypatch.delenv("IA3_TRAINER_DEBUG", raising=False)
    argv = build(tmp_path, adapter, tiny_t5_dir, monkeypatch)
    if name.startswith(("inference-json", "adapter-config")):  # found before the model loads
        monkeypatch.setattr(modeling, "load_model", lambda *args, **kwargs: pytest.fail("model loaded"))
    one_line_error(argv, capsys, expected)
    if name == "disk-full-at-start":  # a run that could not start leaves no run.lock (nor the folder it made)
        assert not (tmp_path / "out").exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))


def test_predict_output_is_written_whole(adapter, tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    assert main(["predict", str(adapter), "Sales rose.", "Profit fell.", "--output", str(output)]) == 0
    assert [json.loads(line)["text"] for line in output.read_text().splitlines()] == ["Sales rose.", "Profit fell."]
    assert [path.name for path in tmp_path.iterdir()] == ["predictions.jsonl"]  # no temporary file left


def test_predict_and_evaluate_replace_files_only_with_overwrite(adapter, tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    assert main(["predict", str(adapter), "Sales rose.", "--output", str(output)]) == 0
    first = output.read_bytes()
    with pytest.raises(SystemExit):
        main(["predict", str(adapter), "Profit fell.", "--output", str(output)])
    assert output.read_bytes() == first
    assert main(["predict", str(adapter), "Profit fell.", "--output", str(output), "--overwrite"]) == 0
    assert json.loads(output.read_text())["text"] == "Profit fell."

    data = write_rows(tmp_path / "eval.jsonl", ROWS[:6])
    report = tmp_path / "report"
    assert main(["evaluate", str(adapter), "--data", str(data), "--output-dir", str(report)]) == 0
    (report / "notes.txt").write_text("kept")
    first = (report / "eval_report.json").read_bytes()
    with pytest.raises(SystemExit):
        main(["evaluate", str(adapter), "--data", str(data), "--output-dir", str(report)])
    assert (report / "eval_report.json").read_bytes() == first
    assert main(["evaluate", str(adapter), "--data", str(write_rows(tmp_path / "e2.jsonl", ROWS[6:9])),
                 "--output-dir", str(report), "--overwrite"]) == 0
    assert json.loads((report / "eval_report.json").read_text())["examples"] == 3
    assert (report / "notes.txt").read_text() == "kept"  # other files are never touched


def test_evaluate_of_a_hub_repo_refuses_a_report_in_the_current_folder(tmp_path, monkeypatch, capsys):
    # Without --output-dir a Hub repo's report goes to ".": a report there is someone's; checked before the download.
    monkeypatch.chdir(tmp_path)
    touch(tmp_path / "eval_report.json")
    monkeypatch.setattr(IA3Predictor, "from_pretrained", lambda *args, **kwargs: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "alice/tiny-ia3"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "ia3-trainer: error: --output-dir: . (where the report goes without --output-dir) holds eval_report.json "
        "already; pass --overwrite to replace them, or choose another --output-dir\n")
    assert (tmp_path / "eval_report.json").read_text() == "a user's own file\n"


def test_evaluate_and_init_read_a_data_file_whose_suffix_is_upper_case(adapter, tmp_path, capsys):
    # init read D.CSV and evaluate refused it: both now ask data.data_file_format.
    data = write_rows(tmp_path / "eval.csv", ROWS[:6]).rename(tmp_path / "EVAL.CSV")
    assert main(["evaluate", str(adapter), "--data", str(data), "--output-dir", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "eval_report.json").read_text())["examples"] == 6
    assert main(["init", "--data", str(data), "-o", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["data"]["path"] == "csv"


def test_predictor_refuses_a_bad_generation_bound(adapter):
    predictor = IA3Predictor.from_pretrained(adapter, device="cpu")
    with pytest.raises(ValueError, match=r"max_new_tokens: must be >= 1, got -3"):
        predictor.predict(["Sales rose."], max_new_tokens=-3)
    with pytest.raises(TypeError, match=r"max_new_tokens: must be an int, got float"):
        predictor.predict(["Sales rose."], max_new_tokens=2.0)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_evaluate_a_file_for_an_adapter_trained_with_a_label_separator(adapter, tmp_path, capsys, suffix):
    """Issue 11: the recipe's data.label_separator applies to .txt lines only; a csv or jsonl has its own columns."""
    data = tmp_path / f"eval{suffix}"
    if suffix == ".txt":
        data.write_text("".join(f"{row['sentence']}@{row['label']}\n" for row in ROWS[:10]))
    else:
        write_rows(data, ROWS[:10])
    assert main(["evaluate", str(adapter), "--data", str(data), "--output-dir", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "eval_report.json").read_text())
    assert report["examples"] == 10 and report["data"] == str(data)
