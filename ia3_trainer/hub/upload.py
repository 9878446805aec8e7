"""Push an adapter folder to the Hugging Face Hub: an allow-list of files, a staging copy, bounded requests, and errors
with no token in them.

A push never writes into the folder it pushes: it copies the allow-listed files (`ADAPTER_FILE_PATTERNS`) into a
temporary staging folder (regular files of the folder only: a symbolic link is skipped and named, never followed),
takes the credentials out of every URL in `recipe.json` and `inference.json` there (`errors.redact_urls`), writes
the model card (`README.md`, for the repo pushed to) and `metrics.json` there, uploads that folder and always
removes it. Every request to the Hub has a timeout (`IA3_TRAINER_HUB_TIMEOUT` seconds, 60 by default, to connect
and for each read or write), and every message about a push goes through `errors.redact`: a server's error can echo
the request's `Authorization` header. `ia3-trainer push` runs [`push_adapter_folder`];
[`~ia3_trainer.hub.callback.PushAdapterToHubCallback`] stages and uploads in the background.
"""

import fnmatch
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ia3_trainer import __version__
from ia3_trainer.errors import HubError, IA3TrainerError, InputError, PathError, redact, redact_urls, shorten
from ia3_trainer.hub.model_card import card_metrics, card_tags, write_model_card
from ia3_trainer.jsonfiles import write_json
from ia3_trainer.layout import CARD_FILE, INFERENCE_FILE
from ia3_trainer.network import TIMEOUT_VARIABLE, bound_hub_requests, hub_offline, request_timeout
from ia3_trainer.recipe.loading import check_repo_id


logger = logging.getLogger(__name__)

# Everything a pushed adapter repo holds. Anything else in the folder (base weights, optimizer.pt, scheduler.pt,
# rng_state*.pth, training_args.bin, trainer_state.json) stays local.
ADAPTER_FILE_PATTERNS = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "*.model",  # sentencepiece: spiece.model (T5), sentencepiece.bpe.model
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "recipe.json",
    INFERENCE_FILE,
    "metrics.json",
    CARD_FILE,
]
# Written into the staging folder by each push, never copied from the folder pushed: peft's generic card and a
# metrics.json of an earlier run must not reach the Hub.
GENERATED_FILES = (CARD_FILE, "metrics.json")


def push_adapter_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload adapter with ia3-trainer",
    metrics: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """Create `repo_id` if needed and upload the adapter of `folder` to it in one commit, synchronously.

    Only the files in `ADAPTER_FILE_PATTERNS` are uploaded, never base model weights or optimizer state. They are
    copied to a temporary folder, with the model card for `repo_id` and `metrics.json` written there; `folder` is
    only read, and the copy is removed whatever happens (an error, a timeout, Ctrl-C). This is what
    `ia3-trainer push OUTPUT_DIR REPO_ID` runs.

    Args:
        folder (`str` or `Path`):
            An adapter folder: the `output_dir` of a run or one of its `checkpoint-*` folders.
        repo_id (`str`):
            Hub repo to push to, `user/name`.
        private (`bool`, *optional*, defaults to `True`):
            Whether a repo created here is private. An existing repo keeps its visibility.
        token (`str`, *optional*):
            Hub token with write access. Defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        endpoint (`str`, *optional*):
            Hub URL. Defaults to `HF_ENDPOINT` or https://huggingface.co.
        commit_message (`str`, *optional*, defaults to `"Upload adapter with ia3-trainer"`):
            Summary of the commit.
        metrics (`dict[str, Any]`, *optional*):
            Final metrics (such as the run's `all_results.json`): uploaded as `metrics.json` and listed in the card.
        timeout (`float`, *optional*):
            Seconds each request may wait for the Hub; defaults to `IA3_TRAINER_HUB_TIMEOUT` or 60.

    Returns:
        [`~huggingface_hub.CommitInfo`]: the commit made (or, when no file changed, the latest one).

    Raises:
        [`InputError`] (a `ValueError`): `repo_id` is not `user/name`.
        [`PathError`] (an `OSError`): `folder` holds no `adapter_config.json`.
        [`HubError`] (an `OSError`): the Hub refused the push or could not be reached in time; the message holds no
            token, and the error it was raised from is the Hub's or the network's own.

    Example:

    >>> push_adapter_folder("outputs/phrasebank", "alice/flan-t5-small-ia3-phrasebank")
    CommitInfo(commit_url='https://huggingface.co/alice/flan-t5-small-ia3-phrasebank/commit/...', ...)
    """
    problem = check_repo_id(repo_id) if isinstance(repo_id, str) else f"expected a str, got {type(repo_id).__name__}"
    if problem:
        raise InputError(key="repo_id", problem=problem)
    timeout = request_timeout(timeout)
    staging = stage_adapter(
        Path(folder), repo_id, metrics={"metrics": metrics} if metrics else None, results=card_metrics([metrics or {}])
    )
    try:
        return upload_staged(
            staging, repo_id, private=private, token=token, endpoint=endpoint, commit_message=commit_message,
            timeout=timeout,
        )
    except IA3TrainerError:
        raise
    except Exception as error:  # HTTP refusals, timeouts and the network's own errors (httpx, OSError) alike
        raise HubError(
            problem=f"could not push {folder} to {repo_id}: "
                    f"{describe_push_error(error, timeout=timeout, token=token)}",
            fix=f"{retry_advice(error)} (nothing in {folder} was changed)",
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage_adapter(
    folder: Path | None,
    repo_id: str,
    *,
    metrics: dict[str, Any] | None,
    results: dict[str, Any],
    save=None,
    recipe_folder: Path | None = None,
) -> Path:
    """A new temporary folder holding what a push of `folder` uploads: its allow-listed files (or what `save(path)`
    writes), `recipe.json` and `inference.json` from `recipe_folder` when it has none, `metrics` as `metrics.json`,
    and the model card for `repo_id` listing `results`. The caller removes it."""
    if folder is not None and not (folder / "adapter_config.json").is_file():
        raise PathError(
            f"{folder}: no adapter_config.json, so there is no adapter to push; pass the output_dir of a finished "
            "run or one of its checkpoint-* folders"
        )
    staging = Path(tempfile.mkdtemp(prefix="ia3-trainer-push-"))
    try:
        if save is not None:
            save(staging)
            for name in GENERATED_FILES:  # peft's save_pretrained writes its own README.md
                (staging / name).unlink(missing_ok=True)
        else:
            skipped = []
            for path in sorted(folder.iterdir()):
                if path.name in GENERATED_FILES or not _allowed(path.name):
                    continue
                if _inside(path, folder):
                    shutil.copy2(path, staging / path.name)
                else:
                    skipped.append(path.name)
            if skipped:
                logger.warning("Not pushed from %s: %s (only regular files inside the folder are uploaded, never "
                               "symbolic links or what they point at)", folder, ", ".join(skipped))
        for name in ("recipe.json", INFERENCE_FILE):  # a checkpoint or an epoch snapshot shows its run's files too
            if recipe_folder is not None and not (staging / name).exists() and _inside(recipe_folder / name,
                                                                                          recipe_folder):
                shutil.copy2(recipe_folder / name, staging / name)
        for name in ("recipe.json", INFERENCE_FILE):  # written by an older version, or by hand: no URL credential
            if (staging / name).is_file():
                text = (staging / name).read_text(encoding="utf-8", errors="surrogateescape")
                if redact_urls(text) != text:
                    (staging / name).write_text(redact_urls(text), encoding="utf-8", errors="surrogateescape")
        if metrics:
            write_json(staging / "metrics.json", metrics)
        tags = card_tags(folder) if folder is not None else None
        write_model_card(staging, repo_id=repo_id, metrics=results, tags=tags)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def create_repo(repo_id: str, *, private: bool, token: str | None, endpoint: str | None, timeout: float) -> None:
    """Create `repo_id` on the Hub unless it exists, each request bounded by `timeout`; an error raised holds no
    token."""
    _api(token, endpoint, timeout, lambda api: api.create_repo(repo_id, private=private, exist_ok=True))


def upload_staged(
    staging: Path,
    repo_id: str,
    *,
    private: bool,
    token: str | None,
    endpoint: str | None,
    commit_message: str,
    timeout: float,
) -> Any:
    """Create the repo if needed and upload every allow-listed file of `staging` in one commit, each request bounded
    by `timeout`. An error raised holds no token (`errors.redact` is applied to it and the errors it chains)."""

    def upload(api):
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=staging, allow_patterns=ADAPTER_FILE_PATTERNS, commit_message=commit_message
        )

    return _api(token, endpoint, timeout, upload)


def _api(token: str | None, endpoint: str | None, timeout: float, call):
    from huggingface_hub import HfApi

    bound_hub_requests(timeout)
    try:
        return call(HfApi(endpoint=endpoint, token=token, library_name="ia3-trainer", library_version=__version__))
    except Exception as error:
        _scrub(error, token)
        raise


def describe_push_error(err: BaseException, limit: int = 300, timeout: float | None = None,
                        token: str | None = None) -> str:
    """`err` as one short line with no token in it (`errors.redact`, before it is cut to `limit`): for an HTTP
    error, the status, the request and the Hub's own message (which can echo the request's headers); for a
    timeout, the limit; for offline mode, that `HF_HUB_OFFLINE` is set."""
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline_error(err):
        return "HF_HUB_OFFLINE is set, so nothing may reach the Hub"
    if _is_timeout(err):
        seconds = timeout if timeout is not None else request_timeout()
        return (f"the Hub did not answer within {seconds:g} s ({type(err).__name__}; {TIMEOUT_VARIABLE} sets this "
                "limit)")
    if not isinstance(err, HfHubHTTPError) or getattr(err, "response", None) is None:
        return shorten(redact(f"{type(err).__name__}: {err}", token), limit)
    request = err.response.request
    text = f"HTTP {err.response.status_code} for {request.method} {request.url}"
    text += f": {err.server_message}" if err.server_message else ""
    if err.response.status_code in (401, 403):
        text += " (check that the token, HF_TOKEN or the one saved by `hf auth login`, may write to this repo)"
    return shorten(redact(text, token), limit)


def retry_advice(err: BaseException) -> str:
    """What to do before running the same push again."""
    if is_offline_error(err) or hub_offline():
        return "unset HF_HUB_OFFLINE (or set it to 0) and push again"
    if _is_timeout(err):
        return f"check the network (or raise {TIMEOUT_VARIABLE}) and push again"
    return "check the network and that HF_TOKEN may write to the repo, then push again"


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is a regular file of `folder` itself: not a symbolic link (nor a file it points at), not a
    folder, not a device or a pipe."""
    import stat

    try:
        mode = path.lstat().st_mode
        return stat.S_ISREG(mode) and path.resolve().parent == folder.resolve()
    except OSError:  # gone, or a symlink loop in `folder`'s own path
        return False


def _allowed(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in ADAPTER_FILE_PATTERNS)


def is_offline_error(err: BaseException) -> bool:
    from huggingface_hub import errors

    offline = getattr(errors, "OfflineModeIsEnabled", None)
    return offline is not None and isinstance(err, offline)


def _is_timeout(err: BaseException) -> bool:
    # httpx's (and httpx2's) TimeoutException is no TimeoutError; its name is the same in both.
    return isinstance(err, TimeoutError) or any(cls.__name__ == "TimeoutException" for cls in type(err).__mro__)


def is_transient(err: BaseException) -> bool:
    """Whether trying the same push again may work: network trouble or a server-side error, not a refusal."""
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline_error(err):
        return False
    if isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
        status = err.response.status_code
        return status >= 500 or status in (408, 429)
    # A missing adapter_config.json (FileNotFoundError) or invalid card metadata (ValueError) will not fix itself.
    return not isinstance(err, (FileNotFoundError, ValueError))


def _scrub(error: BaseException, *secrets: str | None) -> None:
    """Take every token out of `error`'s message and the messages of the errors it chains, in place: the caller
    re-raises it, and a traceback prints them."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.args = tuple(redact(arg, *secrets) if isinstance(arg, str) else arg for arg in error.args)
        for name in ("server_message", "strerror"):
            value = getattr(error, name, None)
            if isinstance(value, str):
                try:
                    setattr(error, name, redact(value, *secrets))
                except AttributeError:
                    pass
        error = error.__cause__ or error.__context__
