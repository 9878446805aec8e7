"""Trust boundaries: no credential of a data URL in a saved or pushed file, no symbolic link followed by a push, no
input overwritten, and what an adapter or a label set holds checked before it is used.

Every Hub call goes to `tests/hub_server.py`, every data download to a file server on 127.0.0.1.
"""

import functools
import hashlib
import json
import logging
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants  # noqa: F401 - hub_server.use_hub patches it; the lazy package loads it late
import pytest

from ia3_trainer.cli.main import main
from ia3_trainer.errors import redact, redact_urls

from conftest import TINY_ASSETS, tiny_recipe
from hub_server import HubServer, use_hub


REPO_ID = "alice/tiny-ia3"
SECRETS = ("pa55word-Q7", "s3cr3t-t0ken", "deadbeef5ig", "ann-the-user")


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        use_hub(monkeypatch, server.endpoint, as_default=True)
        yield server


@pytest.fixture
def data_server(tmp_path, monkeypatch):
    """A plain HTTP file server on 127.0.0.1 serving the tiny data set as `train.jsonl`; records the requests."""
    import datasets

    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copy(TINY_ASSETS / "tiny-sentiment.jsonl", folder / "train.jsonl")
    seen = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - record, don't print
            seen.append((self.path, self.headers.get("Authorization")))

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def all_bytes(folder) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def assert_no_secret(files: dict, where: str) -> None:
    for name, content in files.items():
        for secret in SECRETS:
            assert secret.encode() not in content, f"{secret} in {where}/{name}"


@pytest.mark.parametrize(("url", "expected"), [
    ("https://ann:pw@example.com/train.jsonl?token=abc&split=train",
     "https://***@example.com/train.jsonl?token=***&split=train"),
    ("zip://a.txt::https://u:p@h.com/x.zip?X-Amz-Signature=ab&X-Amz-Date=1#access_token=zz",
     "zip://a.txt::https://***@h.com/x.zip?X-Amz-Signature=***&X-Amz-Date=1#access_token=***"),
    ("https://acct.blob.core.windows.net/c/x.csv?sv=2020&sig=abc%3D&api_key=1&Password=2&client_secret=3",
     "https://acct.blob.core.windows.net/c/x.csv?sv=2020&sig=***&api_key=***&Password=***&client_secret=***"),
    ("s3://AKIA:wJalr@bucket/data.parquet", "s3://***@bucket/data.parquet"),
    ("/data/train.jsonl", "/data/train.jsonl"),
    ("hf://datasets/alice/data/train.jsonl", "hf://datasets/alice/data/train.jsonl"),
    ("https://example.com/a@b/c.csv", "https://example.com/a@b/c.csv"),  # an @ in the path is no user info
])
def test_redact_urls_takes_out_user_info_and_credential_parameters(url, expected):
    assert redact_urls(url) == expected
    assert redact_urls({"data": {"data_files": {"train": [url]}}, "n": 3}) == {
        "data": {"data_files": {"train": [expected]}}, "n": 3}
    assert redact(f"cannot load {url!r}") == f"cannot load {expected!r}"  # the one line an error prints, too


def test_credentials_in_a_data_url_are_in_no_saved_or_pushed_file(hub, data_server, tmp_path, capsys, staging_root):
    port, seen = data_server
    url = f"http://ann-the-user:pa55word-Q7@127.0.0.1:{port}/train.jsonl?token=s3cr3t-t0ken&X-Amz-Signature=deadbeef5ig"
    raw = tiny_recipe(tmp_path, **{
        "data.data_files": {"train": url}, "hub.repo_id": REPO_ID, "hub.strategy": "checkpoint",
        "training.max_steps": 2, "training.save_strategy": "steps", "training.save_steps": 1,
        "description": f"Tiny data read from {url}",
    })
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    before = path.read_bytes()
    assert main(["train", str(path)]) == 0
    assert seen and all(auth and auth.startswith("Basic ") for _, auth in seen)  # the credentials were used
    assert any("token=s3cr3t-t0ken" in request for request, _ in seen)

    # Resuming compares the run's redacted recipe with this one, redacted the same way: the same run.
    assert main(["train", str(path), "--resume", "--set", "training.max_steps=3"]) == 0
    out = tmp_path / "out"
    assert main(["push", str(out), "alice/pushed-by-hand", "--public"]) == 0
    assert path.read_bytes() == before  # the user's recipe keeps working as written

    saved = all_bytes(out)
    assert {"recipe.json", "run.json", "README.md", "checkpoint-3/recipe.json", "checkpoint-3/README.md"} <= set(saved)
    assert_no_secret(saved, str(out))
    redacted = f"http://***@127.0.0.1:{port}/train.jsonl?token=***&X-Amz-Signature=***"
    assert json.loads(saved["recipe.json"])["data"]["data_files"] == {"train": redacted}
    assert json.loads(saved["run.json"])["recipe"]["data"]["data_files"] == {"train": redacted}
    assert len(hub.commits) >= 5  # three checkpoints, the final adapter twice, the push by hand
    for commit in hub.commits:
        assert_no_secret(commit["files"], f"{commit['repo_id']}@{commit['oid']}")
    assert_no_secret({"stdout+stderr": "".join(capsys.readouterr()).encode()}, "the console")
    assert not list(staging_root.glob("ia3-trainer-push-*"))  # every staging copy removed


def test_a_sweep_over_data_urls_stores_no_credential_in_its_study(data_server, tmp_path, capsys):
    # Optuna keeps what it is given in its storage (study.db here, a shared database with --storage): a choice's
    # index, never its text, and the study's spec redacted. Each run still reads its data with the credentials.
    from ia3_trainer.training.sweep import plan_search

    port, seen = data_server
    urls = [f"http://ann-the-user:pa55word-Q7@127.0.0.1:{port}/train.jsonl?token=s3cr3t-t0ken",
            f"http://127.0.0.1:{port}/train.jsonl?X-Amz-Signature=deadbeef5ig"]
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 1, "data.max_eval_samples": 8})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    argv = ["sweep", str(path), "--grid", "data.data_files=" + json.dumps([{"train": url} for url in urls])]
    assert main(argv) == 0
    assert any(auth == "Basic YW5uLXRoZS11c2VyOnBhNTV3b3JkLVE3" for _, auth in seen)  # ann-the-user:pa55word-Q7
    assert any("X-Amz-Signature=deadbeef5ig" in request for request, _ in seen)
    assert main(argv) == 0  # the same command continues the study (done): its redacted spec matches
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [row["data.data_files"] for row in rows] == [{"train": redact_urls(url)} for url in urls]
    assert {row["state"] for row in rows} == {"COMPLETE"}
    files = all_bytes(tmp_path / "out")
    assert "study.db" in files and "results.csv" in files
    assert_no_secret(files, "the sweep folder")
    assert_no_secret({"stdout+stderr": "".join(capsys.readouterr()).encode()}, "the console")  # the table too
    # A searched choice's text is in the spec the study records, redacted there too.
    plan = plan_search(raw, search=["data.data_files=choice:" + json.dumps(urls)])
    assert_no_secret({"spec": json.dumps(plan.spec).encode()}, "the spec")

    # A point's folder is named from its redacted values: no 32-bit hash of a password in a folder name, sweep.json
    # or the study (it would confirm a guess offline), and a new password keeps the folders.
    for url in urls:
        raw_hash = hashlib.sha256(json.dumps({"data.data_files": {"train": url}}).encode()).hexdigest()[:8]
        assert not [name for name, content in files.items() if raw_hash in name or raw_hash.encode() in content]

    def folders(values):
        grid = "data.data_files=" + json.dumps([{"train": url} for url in values])
        return list(plan_search(raw, grid=[grid]).names.values())

    renamed = [url.replace("pa55word", "n3w-pa55").replace("s3cr3t", "n3w").replace("deadbeef", "n3w") for url in urls]
    assert folders(renamed) == folders(urls)
    assert sorted(folders(urls)) == sorted(path.name for path in (tmp_path / "out").iterdir() if path.is_dir())
    # Points that differ only in their credentials still get a folder each, the same ones whatever the passwords.
    twins = [urls[0], urls[0].replace("pa55word-Q7", "other-pa55")]
    assert len(set(folders(twins))) == 2
    assert folders(twins) == folders([url.replace("pa55", "new-pa55") for url in twins])

def test_an_older_runs_recipe_json_is_pushed_without_its_credentials(hub, tmp_path, staging_root):
    from ia3_trainer import IA3Seq2SeqTrainer

    IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1})).train()
    out = tmp_path / "out"
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["data"]["data_files"] = {"train": "https://ann-the-user:pa55word-Q7@example.com/t.jsonl?sig=deadbeef5ig"}
    (out / "recipe.json").write_text(json.dumps(recipe))  # as a version that did not redact wrote it
    assert main(["push", str(out), REPO_ID]) == 0
    files = hub.repo_files(REPO_ID)
    assert_no_secret(files, REPO_ID)
    assert json.loads(files["recipe.json"])["data"]["data_files"] == {"train": "https://***@example.com/t.jsonl?sig=***"}
    assert "pa55word-Q7" in (out / "recipe.json").read_text()  # the folder pushed is only read


def test_push_skips_symbolic_links_and_says_so(hub, tmp_path, caplog, staging_root):
    from ia3_trainer import IA3Seq2SeqTrainer

    IA3Seq2SeqTrainer.from_recipe(tiny_recipe(tmp_path, **{"training.max_steps": 1})).train()
    out = tmp_path / "out"
    private = tmp_path / "private"
    private.mkdir()
    (private / "id_rsa").write_text("PRIVATE KEY ann-the-user\n")
    (out / "spiece.model").symlink_to(private / "id_rsa")  # allow-listed name, private target
    (out / "vocab.txt").symlink_to(out / "tokenizer.json")  # even a link that stays inside the folder
    (out / "merges.txt").symlink_to(private)  # a folder
    with caplog.at_level(logging.WARNING, logger="ia3_trainer.hub.upload"):
        assert main(["push", str(out), REPO_ID]) == 0
    files = hub.repo_files(REPO_ID)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.json"} <= set(files)
    assert not {"spiece.model", "vocab.txt", "merges.txt"} & set(files)
    assert_no_secret(files, REPO_ID)
    [line] = [record.getMessage() for record in caplog.records if record.name == "ia3_trainer.hub.upload"]
    assert line.startswith(f"Not pushed from {out}: merges.txt, spiece.model, vocab.txt (only regular files")
    assert (private / "id_rsa").read_text() == "PRIVATE KEY ann-the-user\n"
    assert not list(staging_root.glob("ia3-trainer-push-*"))  # every staging copy removed


def snapshot(folder) -> dict:
    import hashlib

    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "run.lock"}


def test_overwrite_never_replaces_a_checkpoint_or_a_folder_inside_a_run(tmp_path, capsys):
    out = tmp_path / "out"
    raw = tiny_recipe(tmp_path, **{"training.max_steps": 2, "training.save_strategy": "steps",
                                   "training.save_steps": 1})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    assert main(["train", str(path)]) == 0
    before = snapshot(out)
    (out / "sub").mkdir()  # a folder inside the run, holding a run's files (as if another run's adapter)
    shutil.copy(out / "adapter_config.json", out / "sub" / "adapter_config.json")
    capsys.readouterr()
    assert (out / "checkpoint-2").is_dir()
    for target, what in [(out / "checkpoint-2", f"a checkpoint folder of the run in {out}"),
                         (out / "checkpoint-7", f"a checkpoint folder of the run in {out}"),  # new, yet --overwrite
                         (out / "sub", f"inside the run in {out}"),  # of `out` would remove it
                         (out / "sub" / "new", f"inside the run in {out}")]:
        for overwrite in (["--overwrite"], []):
            with pytest.raises(SystemExit) as info:
                main(["train", str(path), *overwrite, "--set", f"training.output_dir={target}"])
            err = capsys.readouterr().err
            assert info.value.code == 2 and err == (
                f"ia3-trainer: error: training.output_dir: {target} is {what}; a run trains into a folder of its own, "
                "never a checkpoint or a folder inside another run (overwriting applies to a run's own output folder "
                "only); choose another training.output_dir\n")
    shutil.rmtree(out / "sub")
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["../../../x", "a\nb", "a/b", "..", ".hidden", "-rf", "x y", "C:\\x", "x" * 101])
def test_a_recipe_name_is_one_folder_name_of_safe_characters(tmp_path, capsys, name):
    from ia3_trainer import RecipeError, load_recipe
    from ia3_trainer.recipe.loading import safe_name

    raw = tiny_recipe(tmp_path)
    raw["name"] = name
    del raw["training"]["output_dir"]  # the default, outputs/<name>, is what a bad name would escape
    with pytest.raises(RecipeError, match="^<recipe>: name: .* is not one folder name of letters, digits") as info:
        load_recipe(raw)
    assert info.value.errors == [f"<recipe>: name: {name!r} is not one folder name of letters, digits, '.', '_' and "
                                 "'-' starting with a letter or digit (the run's folder is outputs/<name>); use e.g. "
                                 f"{safe_name(name)!r}"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"ia3-trainer: error: {path}: name: ") and err.count("\n") == 1
    assert load_recipe({**raw, "name": safe_name(name)}).training["output_dir"] == f"outputs/{safe_name(name)}"


def test_the_default_name_is_the_recipe_files_stem_made_safe(tmp_path):
    from ia3_trainer import load_recipe

    raw = tiny_recipe(tmp_path)
    del raw["name"]
    path = tmp_path / "my recipe (v2).json"
    path.write_text(json.dumps(raw))
    assert load_recipe(path).name == "my-recipe-v2"


def write_labelled(tmp_path, labels) -> str:
    rows = [{"sentence": f"Sales figure number {i} was reported .", "label": labels[i % len(labels)]}
            for i in range(24)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize(("labels", "message"), [
    (["positive", "positive ", "negative"], "data.label_column: column 'label': labels that differ as text are one "
     "label to the model (['positive', 'positive '] all read 'positive', once tokenized); merge or rename them"),
    (["negative", "\U0001F600", "positive", "\u200b"], "data.label_column: column 'label': labels ['\\u200b', "
     "'\U0001F600'] decode to an empty text with this tokenizer (no token it knows), so no prediction can match them"),
])
def test_labels_the_model_cannot_tell_apart_are_refused_before_training(tmp_path, tokenizer, capsys, labels,
                                                                         message):
    from ia3_trainer import RecipeError, load_recipe
    from ia3_trainer.data.preparation import prepare_data

    raw = tiny_recipe(tmp_path, **{"data.data_files": {"train": write_labelled(tmp_path, labels)}})
    del raw["data"]["label_names"]  # the labels the data holds
    with pytest.raises(RecipeError) as info:
        prepare_data(load_recipe(raw).data, tokenizer)
    assert info.value.errors[0].startswith(message)
    raw["data"]["label_names"] = labels  # the same check when the recipe lists them
    with pytest.raises(RecipeError, match="^data.label_names: labels ") as info:
        prepare_data(load_recipe(raw).data, tokenizer)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    err = capsys.readouterr().err.splitlines()[-1]  # after datasets' progress lines
    assert exit_info.value.code == 2 and err.startswith("ia3-trainer: error: data.label_names: labels ")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


@pytest.fixture
def adapter_dir(tmp_path, tiny_t5_dir):
    """An IA3 adapter of the tiny T5 (its vectors moved away from 1), saved as peft saves one."""
    import peft
    import torch
    from transformers import AutoModelForSeq2SeqLM

    model = peft.get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir),
                                peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ia3_l" in name:
                parameter.fill_(1.5)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder


def _rewrite(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file(change(load_file(str(path))), str(path))


@pytest.mark.parametrize(("change", "message"), [
    (lambda weights: {"shared.weight": next(iter(weights.values()))}, "holds none of the IA3 vectors (keys ending "
     "in .ia3_l; it holds shared.weight, ...): it is not the weights of an IA3 adapter"),
    (lambda weights: {key: value * float("nan") for key, value in weights.items()}, "IA3 vector(s) hold NaN or "
     "infinite values (e.g. base_model.model."),
    (lambda weights: dict(sorted(weights.items())[1:]), "has no IA3 vector for 1 of the model's"),
])
def test_an_adapter_without_its_vectors_or_with_non_finite_ones_is_refused(adapter_dir, capsys, change, message):
    from ia3_trainer import IA3Predictor

    good = IA3Predictor.from_pretrained(adapter_dir, device="cpu")
    _rewrite(adapter_dir, change)
    path = adapter_dir / "adapter_model.safetensors"
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: ")) as info:
        IA3Predictor.from_pretrained(adapter_dir, device="cpu")
    assert message in str(info.value)
    with pytest.raises(ValueError, match=re.escape(message)):  # nor onto a loaded predictor, which stays as it was
        good.load_adapter(adapter_dir, "second")
    assert good.adapters == ["default"]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(adapter_dir), "Sales rose ."])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.startswith(f"ia3-trainer: error: {path}: ") and message in err
