"""Without a network: anything that must come from the Hub fails at once with one line (suggesting HF_HUB_OFFLINE=1),
and a model already in the cache loads from it. The Hub is a closed port on 127.0.0.1 (HF_ENDPOINT), so these tests
behave the same on a machine with internet; the cache is an empty or hand-built HF_HOME.

huggingface_hub's defaults, for the record: each request is retried 5 times (waits 1, 2, 4, 8, 8 s) on connection
errors, per file; `train phrasebank` spent ~50-80 s in retries before its error, a Hub dataset ~25 s.
"""

import json
import os
import subprocess
import sys

from conftest import REPO, TINY_ASSETS, free_port


# Runs each case through the CLI (or the Python API) in one process whose environment says where the Hub is.
RUNNER = r"""
import contextlib, io, json, sys, time
from ia3_trainer.cli.main import main
from ia3_trainer import IA3Seq2SeqTrainer

results = []
for argv in json.loads(sys.argv[1]):
    err, started = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            if argv[0] == "python":  # the Python API: the exception itself
                IA3Seq2SeqTrainer.from_recipe(argv[1], json.loads(argv[2]))
                code = 0
            else:
                code = main(argv)
        except SystemExit as exit:
            code = exit.code
        except Exception as error:
            code = f"{type(error).__name__}: {error}"
            chained = error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__)
            err.write(f"chained={chained}\n")
    results.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - started})
print(json.dumps(results))
"""


def run_cases(cases, tmp_path, offline: bool):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cases)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_line(result, *parts):
    """exit 2, one `ia3-trainer: error:` line holding each part, no traceback, in bounded time."""
    lines = [line for line in result["stderr"].splitlines() if line.startswith("ia3-trainer: error:")]
    assert result["code"] == 2 and len(lines) == 1, result
    assert "Traceback" not in result["stderr"] and all(part in lines[0] for part in parts), result
    assert result["seconds"] < 30, result


def cached_tiny_model(tmp_path, tiny_t5_dir) -> str:
    """A recipe for the Hub id tiny-org/tiny-t5, whose files are in the (hand-built) cache of HF_HOME. It saves no
    adapter: peft's save asks the Hub whether the base's config.json exists (to check the vocabulary size), with
    huggingface_hub's five retries (~24 s) when the Hub is down; that is peft's, not loading's."""
    snapshot = tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-t5" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in tiny_t5_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    recipe = tmp_path / "recipe.json"
    raw = json.loads((REPO / "recipes" / "tiny.json").read_text())
    raw["model"].update(name_or_path="tiny-org/tiny-t5", init="pretrained")
    raw["data"]["data_files"] = {"train": str(TINY_ASSETS / "tiny-sentiment.jsonl")}
    raw["training"].update(output_dir=str(tmp_path / "out"), max_steps=1, eval_strategy="no", save_strategy="no",
                           save_final_adapter=False)
    recipe.write_text(json.dumps(raw))
    return str(recipe)


def trained_from_the_cache(result):
    assert result["code"] == 0 and result["seconds"] < 30, result


def test_network_down_fails_fast_with_one_line(tmp_path, tiny_t5_dir):
    local_model = json.dumps({"model.name_or_path": str(tiny_t5_dir), "model.init": "pretrained",
                              "training.output_dir": str(tmp_path / "out")})
    model, data, adapter, api, cached = run_cases([
        ["train", "phrasebank"],
        ["train", "phrasebank", "--set", f"model.name_or_path={tiny_t5_dir}"],
        ["predict", "someone/some-adapter", "Sales rose."],
        ["python", "phrasebank", local_model],
        ["train", cached_tiny_model(tmp_path, tiny_t5_dir)],
    ], tmp_path, offline=False)
    one_line(model, "model.name_or_path: cannot load a tokenizer from 'bigscience/mt0-large': cannot reach http://",
             "and it is not in the local cache", "HF_HUB_OFFLINE=1")
    one_line(data, "data.data_files: 'zip://FinancialPhraseBank-v1.0/Sentences_AllAgree.txt::hf://datasets/",
             "is on the Hugging Face Hub: cannot reach http://", "HF_HUB_OFFLINE=1")
    one_line(adapter, "someone/some-adapter: no such local folder, and no Hub repo", "cannot reach http://",
             "HF_HUB_OFFLINE=1")
    # From Python: one DataError (a RecipeError) whose message says it all, not a chain of retries and HTTP errors.
    assert api["code"].startswith("DataError: data.data_files: 'zip://") and "chained=False" in api["stderr"]
    assert api["seconds"] < 30
    # A Hub id whose files are in the cache loads from it at once.
    trained_from_the_cache(cached)
    assert "tiny-org/tiny-t5 loaded from the local cache" in cached["stderr"]


def test_offline_mode_fails_with_one_line_naming_the_key(tmp_path, tiny_t5_dir):
    model, data, adapter, cached = run_cases([
        ["train", "phrasebank"],
        ["train", "phrasebank", "--set", f"model.name_or_path={tiny_t5_dir}"],
        ["predict", "someone/no-such-adapter", "some text"],
        ["train", cached_tiny_model(tmp_path, tiny_t5_dir)],
    ], tmp_path, offline=True)
    one_line(model, "model.name_or_path: cannot load a tokenizer from 'bigscience/mt0-large' (HF_HUB_OFFLINE is set")
    one_line(data, "data.data_files: cannot load 'zip://FinancialPhraseBank-v1.0/Sentences_AllAgree.txt::hf://",
             "HF_HUB_OFFLINE is set")
    one_line(adapter, "someone/no-such-adapter: no such local folder")
    trained_from_the_cache(cached)
