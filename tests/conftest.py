"""Shared fixtures: tiny models built from configs (random weights, offline) and the shipped tiny tokenizer."""

import copy
import json
import os
import tempfile
import zipfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
TINY_ASSETS = REPO / "recipes" / "assets"
TINY_MODEL_DIR = TINY_ASSETS / "tiny-t5"
PHRASEBANK_DIR = REPO.parent / "shared" / "data" / "financial_phrasebank"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Hermetic caches: the suite neither reads nor writes the user's Hugging Face caches, whatever HF_HOME or the
# per-library variables say (set before huggingface_hub, datasets and transformers read them at import).
HF_CACHE_ROOT = tempfile.mkdtemp(prefix="ia3-trainer-tests-hf-")
os.environ["HF_HOME"] = HF_CACHE_ROOT
for _variable, _sub in (("HF_HUB_CACHE", "hub"), ("HUGGINGFACE_HUB_CACHE", "hub"), ("HF_XET_CACHE", "xet"),
                        ("HF_ASSETS_CACHE", "assets"), ("HF_DATASETS_CACHE", "datasets"),
                        ("HF_MODULES_CACHE", "modules")):
    os.environ[_variable] = os.path.join(HF_CACHE_ROOT, _sub)
# Known values for every variable the package or the libraries under it read, whatever the shell that runs the
# suite set: online (tests talk to a fake Hub on 127.0.0.1 and load models from folders; tests of offline mode set
# it themselves), no token, the default endpoint and timeouts, no debug tracebacks.
for _variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN",
                  "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_DISABLE_XET", "IA3_TRAINER_DEBUG",
                  "IA3_TRAINER_HUB_TIMEOUT", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "RANK", "LOCAL_RANK",
                  "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(_variable, None)
# A thread count that is no positive number (`OMP_NUM_THREADS=`) is ignored by OpenMP but breaks accelerate's
# int(): leave such a value out (a real choice is kept, and the tests of the thread choice set their own).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    if _variable in os.environ and not os.environ[_variable].strip().isdigit():
        os.environ.pop(_variable)
# Hypothesis keeps its example database and constants under .hypothesis/ in the folder the suite starts from (the
# repo): keep them with the caches instead.
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402


set_hypothesis_home_dir(os.path.join(HF_CACHE_ROOT, "hypothesis"))
# Subprocesses run from a test's tmp_path, never from the repo: they find this checkout's package on PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def pytest_configure(config):
    # Tiny models gain nothing from intra-op threads, and two spinning OpenMP threads on a busy 2-core machine
    # slow each step from milliseconds to about a second.
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(HF_CACHE_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own tmp_path: a relative path (`outputs/tiny`) never reaches the repo or the folder
    the suite was started from."""
    monkeypatch.chdir(tmp_path)


def repo_files(root: Path = REPO) -> dict[str, int]:
    """Every file under `root` (the checkout; caches and bytecode aside) with its modification time: what the
    suite's hermeticity check compares before and after."""
    skip = {"__pycache__", ".git", ".pytest_cache", ".ruff_cache"}
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skip and not name.endswith(".egg-info")]
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, root)] = os.stat(path, follow_symlinks=False).st_mtime_ns
    return files


def changed_files(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The files added, removed or modified between two `repo_files()`, sorted."""
    return sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))


@pytest.fixture(scope="session", autouse=True)
def _repo_untouched(request):
    """The suite's hermeticity check: the repo's files are the same after the suite as before it."""
    before = repo_files()
    yield before
    changed = changed_files(before, repo_files())
    if changed:
        pytest.fail(f"the test suite changed the repo's files: {changed[:20]} (a test wrote into the checkout, or "
                    "a file was edited while the suite ran)", pytrace=False)


def signal_at_first_checkpoint(recipe: str, out: Path, sig: int, cwd, env: dict) -> tuple[int, str]:
    """Run `ia3-trainer train recipe` in a subprocess and send it `sig` once `out` holds a `checkpoint-*` (or after
    120 s, or when it ended first); its return code and stderr."""
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "ia3_trainer", "train", recipe], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoint-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, stderr


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: launched process groups never collide with another run's default 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(model_type: str = "t5", vocab_size: int = 512, **kwargs):
    """A 16-wide, 2+2-layer config of each architecture we support, sized for the shipped tokenizer."""
    from transformers import BartConfig, MT5Config, T5Config

    if model_type in ("t5", "mt5"):
        return tiny_t5_like(T5Config if model_type == "t5" else MT5Config, vocab_size, **kwargs)
    if model_type == "bart":
        defaults = dict(vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                        decoder_start_token_id=0, forced_eos_token_id=1, dropout=0.0)
        return BartConfig(**{**defaults, **kwargs})
    raise ValueError(model_type)


def tiny_t5_like(cls, vocab_size: int = 512, **kwargs):
    """`tiny_config("t5")` as the config class `cls` (T5's own or another of its family: UMT5, LongT5, ...)."""
    defaults = dict(vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                    num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return cls(**{**defaults, **kwargs})


def assert_same_adapter(got: dict, expected: dict) -> None:
    """Two adapter state dicts (`safetensors.torch.load_file`) hold the same tensors, to float noise."""
    import torch

    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(scope="session")
def _tiny_t5_session():
    from transformers import T5ForConditionalGeneration, set_seed

    set_seed(0)
    return T5ForConditionalGeneration(tiny_config("t5"))


@pytest.fixture
def tiny_t5(_tiny_t5_session):
    """A fresh copy per test, so training in one test never leaks into another."""
    return copy.deepcopy(_tiny_t5_session)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, _tiny_t5_session):
    """The tiny T5 saved with its tokenizer, loadable with from_pretrained (as a Hub model would be)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-t5-pretrained")
    _tiny_t5_session.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(folder)
    return folder


def tiny_recipe(tmp_path, **overrides) -> dict:
    """The shipped tiny recipe as a dict, writing into tmp_path, shortened to a few steps; dotted overrides."""
    from ia3_trainer.recipe.loading import apply_overrides

    raw = json.loads((REPO / "recipes" / "tiny.json").read_text())
    raw["model"]["name_or_path"] = str(TINY_MODEL_DIR)
    raw["data"]["data_files"] = {"train": str(TINY_ASSETS / "tiny-sentiment.jsonl")}
    raw["data"]["max_train_samples"] = 64
    raw["data"]["max_eval_samples"] = 24
    raw["training"].update(
        output_dir=str(tmp_path / "out"), num_train_epochs=1, max_steps=4, logging_steps=1,
        per_device_train_batch_size=8, eval_strategy="no", save_strategy="no", dataloader_num_workers=0,
    )
    return apply_overrides(raw, overrides) if overrides else raw


def generate_one_by_one(trainer, dataset=None) -> tuple[list[str], list[str]]:
    """Greedy predictions and references of a trainer's eval set, one example at a time (no padding): an
    evaluation independent of the batched one, to check its metrics against."""
    import torch

    from ia3_trainer.data.labels import longest_labels
    from ia3_trainer.evaluation.metrics import decode

    model, tokenizer = trainer.model.eval(), trainer.processing_class
    dataset = dataset if dataset is not None else trainer.eval_dataset
    bound = trainer.max_new_tokens or longest_labels(dataset)  # free text: the dataset's longest target, as evaluation
    predictions, references = [], []
    for row in dataset:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([row["input_ids"]], device=model.device),
                                 max_new_tokens=bound)
        predictions += decode(out.cpu().numpy(), tokenizer)
        references += decode([row["labels"]], tokenizer)
    return predictions, references


def rank_one_by_one(trainer) -> list[str]:
    """Rank classification by brute force, one example at a time: the candidate label with the lowest mean token
    loss under the model's own loss."""
    import torch

    model, tokenizer = trainer.model.eval(), trainer.processing_class
    chosen = []
    for row in trainer.eval_dataset:
        with torch.no_grad():
            losses = [model(input_ids=torch.tensor([row["input_ids"]]),
                            labels=torch.tensor([tokenizer(text_target=c).input_ids])).loss.item()
                      for c in trainer.candidate_labels]
        chosen.append(trainer.candidate_labels[losses.index(min(losses))])
    return chosen


@pytest.fixture
def phrasebank_zip(tmp_path_factory):
    """The original release's zip layout rebuilt from ../shared (skips when the data is absent)."""
    if not (PHRASEBANK_DIR / "Sentences_AllAgree.txt").is_file():
        pytest.skip(f"Financial PhraseBank not found at {PHRASEBANK_DIR}")
    path = tmp_path_factory.mktemp("phrasebank") / "FinancialPhraseBank-v1.0.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(PHRASEBANK_DIR.glob("*.txt")):
            archive.write(file, f"FinancialPhraseBank-v1.0/{file.name}")
    return path


@pytest.fixture
def staging_root(tmp_path, monkeypatch):
    """The temporary folder pushes stage their uploads in: each test checks that nothing is left there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
