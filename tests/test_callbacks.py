"""PushAdapterToHubCallback and the model card, with the real huggingface_hub client against a fake Hub on 127.0.0.1.

Nothing here reaches the internet: every Hub call goes to `tests/hub_server.py` (or to a closed port).
"""

import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import peft
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerControl,
    TrainerState,
)

from ia3_trainer.errors import HubError, PathError
from ia3_trainer.hub.callback import STRATEGIES, PushAdapterToHubCallback
from ia3_trainer.hub.model_card import write_model_card
from ia3_trainer.hub.upload import push_adapter_folder
from ia3_trainer.network import bound_hub_requests

from hub_server import FAKE_TOKEN, HubServer, closed_endpoint, use_hub


ASSETS = Path(__file__).parent.parent / "recipes" / "assets"
REPO_ID = "alice/tiny-t5-ia3"
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}  # what the shipped BPE tokenizer saves
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "README.md"} | TOKENIZER_FILES
SENTENCES = [
    "Acme Oyj said its net sales rose by 12 % in the first quarter .",
    "Delta Foods said its operating profit fell by 30 % last year .",
    "Orion Media will publish its interim report on Monday .",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shipped tiny T5 (random weights, saved once so that adapters point at a loadable base) and 16 examples."""
    # On small CPU machines torch's intra-op threads make each of these ~5 ms steps take ~1 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-t5")
    torch.manual_seed(0)
    base = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny-t5"))
    base_dir = tmp_path_factory.mktemp("base")
    base.save_pretrained(base_dir)
    rows = [json.loads(line) for line in (ASSETS / "tiny-sentiment.jsonl").read_text().splitlines()[:16]]
    examples = datasets.Dataset.from_list(rows).map(
        lambda row: {
            "input_ids": tokenizer(row["sentence"])["input_ids"],
            "labels": tokenizer(text_target=row["label"])["input_ids"],
        },
        remove_columns=["sentence", "label"],
    )
    yield SimpleNamespace(tokenizer=tokenizer, base_dir=base_dir, examples=examples)
    torch.set_num_threads(threads)


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        use_hub(monkeypatch, server.endpoint)
        yield server


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its content hash and modification time: what "left unchanged" compares."""
    import hashlib

    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def train(tiny, output_dir: Path, callback: PushAdapterToHubCallback, wait: bool = True, **overrides):
    model = peft.get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(tiny.base_dir), peft.IA3Config(task_type="SEQ_2_SEQ_LM")
    )
    settings = {"max_steps": 4, "save_strategy": "no", **overrides}
    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=0.05,
        disable_tqdm=True,
        **settings,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=tiny.examples,
        processing_class=tiny.tokenizer,
        data_collator=DataCollatorForSeq2Seq(tiny.tokenizer, model=model),
        callbacks=[callback],
    )
    trainer.train()  # hands the final push to the callback's thread and returns
    if wait:
        assert callback.wait(timeout=60)
    return trainer


def generate(model, tokenizer) -> list[list[int]]:
    model.eval()
    inputs = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False).tolist()


def test_end_strategy_pushes_adapter_only_and_loads_back(tiny, hub, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "recipe.json").write_text(json.dumps({"data": {"path": "json"}, "hub": {"repo_id": REPO_ID}}))
    callback = PushAdapterToHubCallback(REPO_ID, endpoint=hub.endpoint)
    trainer = train(tiny, tmp_path / "out", callback)

    assert callback.failures == []
    assert [commit["message"] for commit in hub.commits] == ["Upload final adapter (step 4)"]
    assert callback.pushed_commits == [f"{hub.endpoint}/{REPO_ID}/commit/{hub.commits[0]['oid']}"]
    files = hub.commits[0]["files"]
    assert set(files) == ADAPTER_FILES | {"recipe.json"}
    base_size = (tiny.base_dir / "model.safetensors").stat().st_size
    assert all(len(content) < base_size for content in files.values())
    assert json.loads(files["metrics.json"])["metrics"]["train_loss"] > 0
    card = files["README.md"].decode()
    assert "library_name: peft" in card and "| train_loss |" in card
    assert f'AutoPeftModelForSeq2SeqLM.from_pretrained("{REPO_ID}")' in card
    assert hub.repos[REPO_ID].private
    # One card: the one the run folder holds (ours: peft's generic card was replaced) is the one pushed.
    assert files["README.md"] == (tmp_path / "out" / "README.md").read_bytes()
    assert b"Model Card for Model ID" not in files["README.md"]

    # The token went to the Hub in headers only: not in any request body, uploaded file, local file or log.
    assert any(r["headers"].get("authorization") == f"Bearer {FAKE_TOKEN}" for r in hub.requests)
    assert not any(FAKE_TOKEN.encode() in r["body"] for r in hub.requests)
    assert not any(
        FAKE_TOKEN.encode() in path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()
    )
    assert FAKE_TOKEN not in caplog.text

    downloaded = huggingface_hub.snapshot_download(REPO_ID, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert {path.name for path in Path(downloaded).iterdir()} == set(files)
    loaded = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(downloaded)
    assert generate(loaded, AutoTokenizer.from_pretrained(downloaded)) == generate(trainer.model, tiny.tokenizer)
    trained_ia3 = {name: p for name, p in trainer.model.named_parameters() if "ia3_l" in name}
    assert trained_ia3 and not all(torch.equal(p, torch.ones_like(p)) for p in trained_ia3.values())
    loaded_ia3 = dict(loaded.named_parameters())
    assert all(torch.equal(loaded_ia3[name], p) for name, p in trained_ia3.items())


def test_epoch_strategy_pushes_every_epoch_then_final(tiny, hub, tmp_path, staging_root):
    callback = PushAdapterToHubCallback(REPO_ID, strategy="epoch", endpoint=hub.endpoint)
    train(tiny, tmp_path / "out", callback, max_steps=-1, num_train_epochs=2)

    assert callback.failures == []
    assert [commit["message"] for commit in hub.commits] == [
        "Upload adapter at epoch 1 (step 4)",
        "Upload adapter at epoch 2 (step 8)",
        "Upload final adapter (step 8)",
    ]
    assert set(hub.commits[0]["files"]) == ADAPTER_FILES
    # The Hub skips unchanged files: the final adapter is the epoch-2 one, only metrics and card moved on.
    assert set(hub.commits[2]["files"]) == {"metrics.json", "README.md"}
    assert set(hub.repo_files(REPO_ID)) == ADAPTER_FILES
    # Epoch snapshots (save_strategy "no") went straight into the staging folders, removed since: the run folder
    # holds the final adapter only, with our card.
    out = tmp_path / "out"
    assert {path.name for path in out.iterdir()} == ADAPTER_FILES - {"metrics.json"}
    assert b"ia3-trainer" in (out / "README.md").read_bytes()
    assert list(staging_root.iterdir()) == []


def test_a_push_that_cannot_be_staged_is_reported_and_training_goes_on(tiny, hub, tmp_path, monkeypatch, caplog):
    # Staging (copy, save_pretrained, card) runs on the training thread: a temporary folder that cannot be written
    # is one failed push, never an exception in Trainer.
    import tempfile

    token = "hf_" + "s" * 30
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / f"gone-{token}"))  # mkdtemp fails, naming it
    callback = PushAdapterToHubCallback(REPO_ID, strategy="epoch", token=token, endpoint=hub.endpoint)
    output_dir = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="ia3_trainer.hub.callback"):
        trainer = train(tiny, output_dir, callback, max_steps=-1, num_train_epochs=2)

    assert trainer.state.global_step == 8 and (output_dir / "adapter_model.safetensors").is_file()
    assert hub.commits == [] and callback.pushed_commits == []
    assert len(callback.failures) == 3  # epoch 1, epoch 2, final
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR] == callback.failures
    for message in callback.failures:
        assert "could not stage a copy to upload: FileNotFoundError" in message and "\n" not in message
        assert f"ia3-trainer push {output_dir} {REPO_ID}" in message and token not in message
    first = f"Could not push to Hub repo {REPO_ID} (Upload adapter at epoch 1 (step 4))"
    assert callback.failures[0].startswith(first)
    assert "Training goes on" in callback.failures[0] and "The adapter is saved in" in callback.failures[2]


def test_checkpoint_strategy_pushes_every_checkpoint_then_final(tiny, hub, tmp_path):
    callback = PushAdapterToHubCallback(REPO_ID, strategy="checkpoint", endpoint=hub.endpoint)
    train(tiny, tmp_path / "out", callback, save_strategy="steps", save_steps=2, save_total_limit=1)

    assert callback.failures == []
    assert [commit["message"] for commit in hub.commits] == [
        "Upload adapter at step 2 (epoch 0.50)",
        "Upload adapter at step 4 (epoch 1.00)",
        "Upload final adapter (step 4)",
    ]
    assert len(callback.pushed_commits) == 3
    # Checkpoints also hold optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin.
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").is_file()
    assert set(hub.repo_files(REPO_ID)) == ADAPTER_FILES
    # The push wrote its card and metrics.json into its staging copy only: the checkpoint keeps what the Trainer
    # saved (a plain Seq2SeqTrainer: peft's generic card), and peft's card never reached the Hub.
    assert not (checkpoint / "metrics.json").exists()
    assert b"Model Card for Model ID" in (checkpoint / "README.md").read_bytes()
    for commit in hub.commits:
        assert b"ia3-trainer" in commit["files"]["README.md"]
        assert b"Model Card for Model ID" not in commit["files"]["README.md"]


# Failing the first two writes hits create_repo (at train begin, then at the push); failing two commits makes the
# push upload everything again (the LFS object is already there, so only the commit is sent again).
@pytest.mark.parametrize("path", ["", "/commit/"], ids=["any-write", "commit"])
def test_push_retries_after_server_errors(tiny, hub, tmp_path, path):
    hub.fail_next(2, path=path)
    callback = PushAdapterToHubCallback(REPO_ID, endpoint=hub.endpoint, backoff_seconds=0.05)
    train(tiny, tmp_path / "out", callback)

    assert [r["status"] for r in hub.requests if path in r["path"]].count(500) == 2
    assert callback.failures == []
    assert len(callback.pushed_commits) == 1
    assert set(hub.repo_files(REPO_ID)) == ADAPTER_FILES


def test_hub_down_keeps_training_and_reports_one_line(tiny, tmp_path, monkeypatch, caplog):
    endpoint = closed_endpoint()
    use_hub(monkeypatch, endpoint)
    output_dir = tmp_path / "out"
    callback = PushAdapterToHubCallback(REPO_ID, endpoint=endpoint, max_retries=2, backoff_seconds=0.01)
    train(tiny, output_dir, callback)

    assert (output_dir / "adapter_model.safetensors").is_file()
    assert callback.pushed_commits == []
    [message] = callback.failures
    assert "after 3 attempt(s)" in message
    assert f"ia3-trainer push {output_dir} {REPO_ID}" in message
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR] == [message]
    assert "\n" not in message


def test_wrong_token_is_reported_without_retry_or_leak(tiny, hub, tmp_path, caplog):
    bad_token = "hf_wrong_token_456"
    output_dir = tmp_path / "out"
    callback = PushAdapterToHubCallback(REPO_ID, token=bad_token, endpoint=hub.endpoint, backoff_seconds=0.01)
    train(tiny, output_dir, callback)

    assert hub.commits == []
    assert {r["status"] for r in hub.requests} == {401}
    [message] = callback.failures
    assert "after 1 attempt(s)" in message and "401" in message
    assert f"ia3-trainer push {output_dir} {REPO_ID}" in message
    assert bad_token not in caplog.text and bad_token not in message
    assert (output_dir / "adapter_config.json").is_file()


def test_only_the_main_process_touches_the_hub(hub, tmp_path):
    callback = PushAdapterToHubCallback(REPO_ID, strategy="epoch", endpoint=hub.endpoint)
    args = SimpleNamespace(output_dir=str(tmp_path), save_strategy="epoch")
    state, control = TrainerState(is_world_process_zero=False, global_step=4, epoch=1.0), TrainerControl()
    for event in ("on_train_begin", "on_save", "on_epoch_end", "on_train_end"):
        getattr(callback, event)(args, state, control, model=None, processing_class=None)

    assert hub.requests == []
    assert list(tmp_path.iterdir()) == []


def test_model_must_be_a_peft_model(tmp_path):
    callback = PushAdapterToHubCallback(REPO_ID)
    with pytest.raises(TypeError, match=r"Linear.*peft.get_peft_model"):
        callback.on_train_begin(SimpleNamespace(), TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repo_id": "alice/bad--name"}, r"^hub\.repo_id: .*use 'user/name'"),
        ({"repo_id": "no-namespace"}, r"^hub\.repo_id: 'no-namespace' has no namespace"),
        ({"repo_id": REPO_ID, "strategy": "steps"}, r"^hub\.strategy: 'steps' is not one of 'end', 'epoch'"),
        ({"repo_id": REPO_ID, "max_retries": -1}, r"^max_retries: must be 0 or more"),
        ({"repo_id": REPO_ID, "timeout": 0}, r"^timeout: expected a number of seconds above 0, such as 60, got 0$"),
    ],
)
def test_bad_arguments_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PushAdapterToHubCallback(**kwargs)


@pytest.mark.parametrize(("value", "match"), [
    ("soon", r"^IA3_TRAINER_HUB_TIMEOUT: expected a number of seconds such as 60, got 'soon'$"),
    ("inf", r"^IA3_TRAINER_HUB_TIMEOUT: expected a number of seconds above 0, such as 60, got inf$"),
])
def test_a_bad_timeout_variable_fails_early(monkeypatch, value, match):
    monkeypatch.setenv("IA3_TRAINER_HUB_TIMEOUT", value)
    with pytest.raises(ValueError, match=match):
        PushAdapterToHubCallback(REPO_ID)
    monkeypatch.setenv("IA3_TRAINER_HUB_TIMEOUT", "2.5")
    assert PushAdapterToHubCallback(REPO_ID).wait_limit == 12.5


def test_push_adapter_folder_needs_an_adapter(tmp_path):
    with pytest.raises(PathError, match="no adapter_config.json"):
        push_adapter_folder(tmp_path, REPO_ID, endpoint=closed_endpoint())


def test_model_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    config = {
        "base_model_name_or_path": "google/flan-t5-small",
        "peft_type": "IA3",
        "task_type": "SEQ_2_SEQ_LM",
        "target_modules": ["wo", "k", "v"],
        "feedforward_modules": ["wo"],
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    recipe = {"description": "Sentiment of financial news.", "data": {"path": "takala/financial_phrasebank"}}
    path = write_model_card(
        tmp_path, repo_id=REPO_ID, metrics={"eval_loss": 0.41234, "step": 40}, recipe=recipe, trainable_parameters=1234
    )

    card = huggingface_hub.ModelCard.load(path)
    assert card.data.library_name == "peft"
    assert card.data.base_model == "google/flan-t5-small"
    assert card.data.datasets == ["takala/financial_phrasebank"]
    assert card.data.tags == ["peft", "ia3", "ia3-trainer", "text2text-generation"]
    assert f'AutoPeftModelForSeq2SeqLM.from_pretrained("{REPO_ID}")' in card.text
    assert f'AutoTokenizer.from_pretrained("{REPO_ID}")' in card.text
    assert "model.generate(" in card.text
    assert "`k`, `v`, `wo`" in card.text and "1,234" in card.text and "| eval_loss | 0.4123 |" in card.text
    assert "Sentiment of financial news." in card.text
    assert FAKE_TOKEN not in path.read_text()


def test_model_card_keeps_local_paths_out_of_metadata(tmp_path):
    config = {"base_model_name_or_path": str(tmp_path), "task_type": "SEQ_2_SEQ_LM", "target_modules": ["k"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    recipe = {"data": {"path": "json", "data_files": "train.jsonl"}}
    card = huggingface_hub.ModelCard.load(write_model_card(tmp_path, repo_id=REPO_ID, recipe=recipe))

    assert card.data.base_model is None and card.data.datasets is None
    assert f"`{tmp_path}`" in card.text and "`json` files: `train.jsonl`" in card.text
    # Any of datasets' builders of files is no Hub dataset: the card and data loading ask the same function.
    recipe = {"data": {"path": "imagefolder", "data_files": "pictures/*.png"}}
    assert huggingface_hub.ModelCard.load(write_model_card(tmp_path, recipe=recipe)).data.datasets is None
    from ia3_trainer.data.sources import is_hub_dataset

    paths = ["takala/financial_phrasebank", "csv", "webdataset", "imagefolder", str(tmp_path), None, ""]
    assert [is_hub_dataset(path) for path in paths] == [True, False, False, False, False, False, False]


# --- a Hub that misbehaves: echoed secrets, no answer, offline mode --------------------------------------------------

SECRET = "hf_OnlyGivenToTheCallback0123456789"  # passed as token=, in no environment variable


@pytest.mark.parametrize("status", [500, 400], ids=["retried", "final"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_token_the_hub_echoes_never_leaks(tiny, tmp_path, monkeypatch, caplog, capsys, staging_root, strategy,
                                            status):
    """Every write answers an error whose message repeats the request's headers, Authorization included: the
    repo creation at train begin, each checkpoint/epoch push and the final push (retried or not) report it redacted."""
    # huggingface_hub's and httpx's own records too. (At DEBUG, httpcore traces every response's raw headers, which
    # this server fills with the token: a trace level no redaction of ours reaches.)
    caplog.set_level(logging.INFO)
    with HubServer(tokens={SECRET}) as hub:
        use_hub(monkeypatch, hub.endpoint)
        monkeypatch.delenv("HF_TOKEN")
        hub.fail_next(1000, status=status, echo_headers=True)
        callback = PushAdapterToHubCallback(REPO_ID, strategy=strategy, token=SECRET, endpoint=hub.endpoint,
                                            max_retries=1, backoff_seconds=0.01)
        train(tiny, tmp_path / "out", callback, save_strategy="steps", save_steps=2)
    pushes = {"end": 1, "epoch": 2, "checkpoint": 3}[strategy]

    assert any(r["headers"].get("authorization") == f"Bearer {SECRET}" for r in hub.requests)
    assert len(callback.failures) == pushes and all("Bearer ***" in failure for failure in callback.failures)
    assert hub.commits == []
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, *callback.failures):
        assert SECRET not in text
    assert not any(SECRET.encode() in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    assert list(staging_root.iterdir()) == []


def test_push_adapter_folder_raises_errors_without_the_token(tiny, tmp_path, monkeypatch, staging_root):
    from huggingface_hub.errors import HfHubHTTPError

    callback = PushAdapterToHubCallback(REPO_ID, endpoint=closed_endpoint(), max_retries=0)
    train(tiny, tmp_path / "out", callback)
    before = snapshot(tmp_path / "out")
    with HubServer(tokens={SECRET}) as hub:
        use_hub(monkeypatch, hub.endpoint)
        monkeypatch.delenv("HF_TOKEN")
        hub.fail_next(1, status=400, echo_headers=True)
        with pytest.raises(HubError) as info:
            push_adapter_folder(tmp_path / "out", REPO_ID, token=SECRET, endpoint=hub.endpoint)
    # One line saying what the Hub answered, raised from the Hub's own error (both without the token).
    assert str(info.value).startswith(f"could not push {tmp_path / 'out'} to {REPO_ID}: HTTP 400 for POST ")
    assert isinstance(info.value.__cause__, HfHubHTTPError) and info.value.__cause__.response.status_code == 400
    assert SECRET not in "".join(traceback.format_exception(info.value))
    assert "Bearer ***" in str(info.value)
    assert snapshot(tmp_path / "out") == before
    assert list(staging_root.iterdir()) == []


@pytest.mark.parametrize("strategy", ["end", "epoch"])
def test_offline_mode_says_so_once_and_attempts_nothing(tiny, hub, tmp_path, monkeypatch, caplog, strategy):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    output_dir = tmp_path / "out"
    # Default backoff: retrying the final push would take 14 s.
    callback = PushAdapterToHubCallback(REPO_ID, strategy=strategy, endpoint=hub.endpoint)
    start = time.monotonic()
    train(tiny, output_dir, callback, max_steps=-1, num_train_epochs=2)

    assert time.monotonic() - start < 10
    assert hub.requests == []
    [message] = callback.failures
    assert message == (f"HF_HUB_OFFLINE is set, so nothing is pushed to Hub repo {REPO_ID} in this run; after "
                       f"training, push the adapter (with HF_HUB_OFFLINE unset) with: ia3-trainer push {output_dir} "
                       f"{REPO_ID}")
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("ia3_trainer") and r.levelno >= logging.INFO]
    assert ours == [message]
    assert (output_dir / "adapter_model.safetensors").is_file()


def test_a_hub_that_never_answers_ends_each_push_within_its_timeouts(tiny, hub, tmp_path, staging_root):
    hub.hang = True
    callback = PushAdapterToHubCallback(REPO_ID, endpoint=hub.endpoint, timeout=0.5, max_retries=1,
                                        backoff_seconds=0.01)
    start = time.monotonic()
    train(tiny, tmp_path / "out", callback, wait=False)
    assert callback.wait()  # no limit given: bounded by the request timeouts and the retries

    assert time.monotonic() - start < 30
    [message] = callback.failures
    assert "after 2 attempt(s): the Hub did not answer within 0.5 s" in message
    assert "IA3_TRAINER_HUB_TIMEOUT" in message
    assert list(staging_root.iterdir()) == []


def test_wait_is_bounded_and_cancel_gives_up(tiny, hub, tmp_path, staging_root):
    hub.hang = True
    callback = PushAdapterToHubCallback(REPO_ID, endpoint=hub.endpoint, timeout=30)
    assert callback.wait_limit == 150
    train(tiny, tmp_path / "out", callback, wait=False)  # on_train_end hands the push over and returns

    assert callback.pending == ["create the repo", "Upload final adapter (step 4)"]
    start = time.monotonic()
    assert callback.wait(timeout=0.2) is False
    assert time.monotonic() - start < 5
    line = callback.cancel()
    assert line.startswith(f"Stopped waiting: 1 push(es) to Hub repo {REPO_ID} did not finish (Upload final adapter")
    assert line.endswith(f"push it later with: ia3-trainer push {tmp_path / 'out'} {REPO_ID}")
    assert callback.failures == [line] and callback.pending == []
    assert list(staging_root.iterdir()) == []  # the queued push never started; its staging copy is gone


def test_hub_requests_get_a_timeout_unless_the_client_has_one(monkeypatch):
    from huggingface_hub.utils import _http

    def unbounded():  # huggingface_hub 2.4's own client (some 1.x releases set 10 s)
        client = _http.default_client_factory()
        client.timeout = None
        return client

    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", unbounded)  # restored after the test
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    bound_hub_requests(7.0)
    session = huggingface_hub.get_session()
    assert (session.timeout.connect, session.timeout.read, session.timeout.write) == (7.0, 7.0, 7.0)
    bound_hub_requests(7.0)  # the same bound: the shared client is kept
    assert huggingface_hub.get_session() is session
    bound_hub_requests(3.0)
    assert huggingface_hub.get_session() is not session and huggingface_hub.get_session().timeout.read == 3.0

    client_class = type(session)  # httpx2.Client (huggingface_hub 2.x) or httpx.Client (1.x)
    huggingface_hub.set_client_factory(lambda: client_class(timeout=1.5))  # a user's own client, with a timeout
    bound_hub_requests(7.0)
    assert huggingface_hub.get_session().timeout.read == 1.5
    huggingface_hub.close_session()


SCRIPT = """
import peft, sys
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers import DataCollatorForSeq2Seq
import datasets
from ia3_trainer import PushAdapterToHubCallback

assets, output_dir, repo_id = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(f"{assets}/tiny-t5")
model = peft.get_peft_model(AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(f"{assets}/tiny-t5")),
                            peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
rows = [{"input_ids": tokenizer("good")["input_ids"], "labels": tokenizer(text_target="positive")["input_ids"]}] * 4
args = Seq2SeqTrainingArguments(output_dir, report_to="none", use_cpu=True, max_steps=1, disable_tqdm=True)
trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                         callbacks=[PushAdapterToHubCallback(repo_id, backoff_seconds=5)])
trainer.train()
print("trained", flush=True)
"""


@pytest.mark.slow
def test_the_interpreter_exit_waits_a_bounded_time_for_a_push(tmp_path):
    """A script that never calls wait(): at exit the push is waited for at most 5 request timeouts, saying so."""
    with HubServer() as hub:
        hub.hang = True
        (tmp_path / "tmp").mkdir()
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": "0", "IA3_TRAINER_HUB_TIMEOUT": "1", "TMPDIR": str(tmp_path / "tmp"),
               "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-c", SCRIPT, str(ASSETS), str(tmp_path / "out"), REPO_ID]
        # A wait that never ended would hit the subprocess timeout.
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if REPO_ID in line]
    assert lines[0] == (f"Waiting up to 5 s for Hub repo {REPO_ID}: create the repo; Upload final adapter (step 1) "
                        "(Ctrl-C stops waiting)")
    assert lines[1].startswith(f"Could not create Hub repo {REPO_ID} yet (the Hub did not answer within 1 s")
    assert lines[2].startswith(f"Stopped waiting after 5 s: 1 push(es) to Hub repo {REPO_ID} did not finish")
    assert lines[2].endswith(f"push it later with: ia3-trainer push {tmp_path / 'out'} {REPO_ID}")
    assert len(lines) == 3
    assert list((tmp_path / "tmp").iterdir()) == []


def test_model_card_of_a_run_not_pushed_names_its_folder(tmp_path):
    config = {"base_model_name_or_path": "google/flan-t5-small", "task_type": "SEQ_2_SEQ_LM", "target_modules": ["k"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "recipe.json").write_text(json.dumps({"name": "tiny", "training": {"output_dir": "outputs/tiny"}}))
    card = huggingface_hub.ModelCard.load(write_model_card(tmp_path, tags=["my-tag"]))

    assert card.text.lstrip().startswith("# tiny")
    assert 'from_pretrained("outputs/tiny")' in card.text
    assert card.data.tags == ["peft", "ia3", "ia3-trainer", "my-tag", "text2text-generation"]
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, renamed over README.md


def test_an_adapter_download_from_a_hub_that_never_answers_ends_in_bounded_time(monkeypatch):
    # predict / evaluate / merge with a Hub repo id: the Hub answered the reachability check, then nothing.
    from huggingface_hub.utils import _http

    from ia3_trainer import network
    from ia3_trainer.inference.adapters import resolve_adapter

    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)  # restored after the test
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)
    monkeypatch.setenv("IA3_TRAINER_HUB_TIMEOUT", "1")
    with HubServer() as server:
        use_hub(monkeypatch, server.endpoint, as_default=True)
        assert network.hub_unreachable() is None  # it answers, and the answer is kept
        server.hang = True
        started = time.monotonic()
        with pytest.raises(HubError, match="alice/some-adapter: no such local folder"):
            resolve_adapter("alice/some-adapter")
        assert time.monotonic() - started < 30  # was: for ever
    huggingface_hub.close_session()
