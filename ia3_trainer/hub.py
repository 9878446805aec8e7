"""Push an adapter folder to the Hugging Face Hub; [`PushAdapterToHubCallback`] does it while a Trainer trains.

A push never writes into the folder it pushes: it copies the allow-listed files (`ADAPTER_FILE_PATTERNS`) into a
temporary staging folder, writes the model card (`README.md`, for the repo pushed to) and `metrics.json` there,
uploads that folder and always removes it. Every request to the Hub has a timeout (`IA3_TRAINER_HUB_TIMEOUT`
seconds, 60 by default, to connect and for each read or write), and every message about a push goes through
`errors.redact`: a server's error can echo the request's `Authorization` header.
"""

import atexit
import fnmatch
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Any, Literal

# The base class must exist when the class statement runs, so transformers is imported with this module (about 3 s,
# torch included); `cli` imports this module only inside the commands that push.
from transformers import TrainerCallback

from . import __version__
from ._schema import write_json
from .checkpoints import INFERENCE_FILE
from .errors import one_line, redact, shorten
from .model_card import CARD_FILE, card_metrics, card_tags, write_model_card
from .recipe import check_repo_id


logger = logging.getLogger(__name__)

STRATEGIES = ("end", "epoch", "checkpoint")
TIMEOUT_VARIABLE = "IA3_TRAINER_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
WAIT_FACTOR = 5  # the end of `ia3-trainer train` (and of the interpreter) waits at most this many request timeouts

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


def request_timeout(timeout: float | None = None) -> float:
    """Seconds each Hub request may take to connect, and each read or write of it to make progress: `timeout`, else
    `IA3_TRAINER_HUB_TIMEOUT`, else 60. A slow upload that keeps moving is not cut."""
    where = "timeout"
    if timeout is None:
        text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        where = TIMEOUT_VARIABLE
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_VARIABLE}: expected a number of seconds such as 60, got {text!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"{where}: expected a number of seconds above 0, such as 60, got {timeout!r}")
    return float(timeout)


class _BoundedClientFactory:
    """Builds huggingface_hub's shared HTTP client with the installed factory, then gives it `timeout` unless that
    factory already set one."""

    def __init__(self, base, timeout: float):
        self.base, self.timeout = base, timeout

    def __call__(self):
        client = self.base()
        bounds = client.timeout
        if all(getattr(bounds, name, None) is None for name in ("connect", "read", "write", "pool")):
            client.timeout = self.timeout  # httpx turns a number into the same bound for each phase
        return client


_FACTORY_LOCK = threading.Lock()


def bound_hub_requests(timeout: float) -> None:
    """Give every request huggingface_hub sends through its shared HTTP client a timeout of `timeout` seconds.

    huggingface_hub 2.4 builds that client with `timeout=None` (some 1.x releases with 10 s) and sends
    `create_repo`, the README check, `preupload`, the LFS calls and `commit` without a timeout of their own: a Hub
    that accepts the connection and never answers blocked a push for ever. This wraps the installed client factory
    (`set_client_factory`; a client someone configured with a timeout keeps it), so a client huggingface_hub builds
    again after a connection error is bounded too. Downloads that pass their own timeout are unaffected. Uploads
    through Xet (`hf_xet`) use that package's own network code and timeouts.
    """
    import huggingface_hub
    from huggingface_hub.utils import _http  # the installed factory has no public getter (1.x and 2.x)

    with _FACTORY_LOCK:
        installed = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        if isinstance(installed, _BoundedClientFactory) and installed.timeout == timeout:
            return
        base = installed.base if isinstance(installed, _BoundedClientFactory) else installed
        huggingface_hub.set_client_factory(_BoundedClientFactory(base or _http.default_client_factory, timeout))


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (read by huggingface_hub when it is imported) forbids every request to the Hub."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


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
        `ValueError`: `repo_id` is not `user/name`.
        `FileNotFoundError`: `folder` holds no `adapter_config.json`.
        [`~huggingface_hub.errors.HfHubHTTPError`], `OSError` or an `httpx` error: the Hub refused the push or could
        not be reached in time; the message holds no token.

    Example:

    >>> push_adapter_folder("outputs/phrasebank", "alice/flan-t5-small-ia3-phrasebank")
    CommitInfo(commit_url='https://huggingface.co/alice/flan-t5-small-ia3-phrasebank/commit/...', ...)
    """
    problem = check_repo_id(repo_id) if isinstance(repo_id, str) else f"expected a str, got {type(repo_id).__name__}"
    if problem:
        raise ValueError(f"repo_id: {problem}")
    timeout = request_timeout(timeout)
    staging = stage_adapter(
        Path(folder), repo_id, metrics={"metrics": metrics} if metrics else None, results=card_metrics([metrics or {}])
    )
    try:
        return upload_staged(
            staging, repo_id, private=private, token=token, endpoint=endpoint, commit_message=commit_message,
            timeout=timeout,
        )
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
        raise FileNotFoundError(
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
            for path in folder.iterdir():
                if path.name not in GENERATED_FILES and path.is_file() and _allowed(path.name):
                    shutil.copy2(path, staging / path.name)
        for name in ("recipe.json", INFERENCE_FILE):  # a checkpoint or an epoch snapshot shows its run's files too
            if recipe_folder is not None and not (staging / name).exists() and (recipe_folder / name).is_file():
                shutil.copy2(recipe_folder / name, staging / name)
        if metrics:
            write_json(staging / "metrics.json", metrics)
        tags = card_tags(folder) if folder is not None else None
        write_model_card(staging, repo_id=repo_id, metrics=results, tags=tags)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


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
    from huggingface_hub import HfApi

    bound_hub_requests(timeout)
    api = HfApi(endpoint=endpoint, token=token, library_name="ia3-trainer", library_version=__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=staging, allow_patterns=ADAPTER_FILE_PATTERNS, commit_message=commit_message
        )
    except Exception as error:
        _scrub(error, token)
        raise


def describe_push_error(err: BaseException, limit: int = 300, timeout: float | None = None,
                        token: str | None = None) -> str:
    """`err` as one short line with no token in it (`errors.redact`, before it is cut to `limit`): for an HTTP
    error, the status, the request and the Hub's own message (which can echo the request's headers); for a
    timeout, the limit; for offline mode, that `HF_HUB_OFFLINE` is set."""
    from huggingface_hub.errors import HfHubHTTPError

    if _is_offline_error(err):
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
    if _is_offline_error(err) or hub_offline():
        return "unset HF_HUB_OFFLINE (or set it to 0) and run the same command again"
    if _is_timeout(err):
        return f"check the network (or raise {TIMEOUT_VARIABLE}) and run the same command again"
    return "check the network and that HF_TOKEN may write to the repo, then run the same command again"


class PushAdapterToHubCallback(TrainerCallback):
    """Push the adapter to the Hub at the end of training, and optionally after every epoch or checkpoint.

    Add it to any [`~transformers.Seq2SeqTrainer`] that trains a [`~peft.PeftModel`]. Each push copies the adapter
    files into a temporary folder, writes the model card (`README.md`) and `metrics.json` there, and uploads that
    copy in a background thread, so training never waits for the Hub; the run's own folders are not written to.
    Only the main process pushes.

    Every request has a timeout (`timeout`). A push that fails for a transient reason (network error, timeout, HTTP
    5xx, 408, 429) is retried with exponential backoff; a refusal, or `HF_HUB_OFFLINE` being set, is final at once.
    A push that fails for good does not stop training: it is logged as one line (no token in it) saying where the
    adapter is and how to push it later, and kept in `failures`.

    `on_train_end` hands the final push to the background thread and returns. `ia3-trainer train` writes its
    results and report, then waits for the push (at most `wait_limit` seconds, saying so). From Python, call
    [`~PushAdapterToHubCallback.wait`]; a push still running when the interpreter exits is waited for at most
    `wait_limit` seconds, with a warning, and Ctrl-C stops that wait.

    Args:
        > Parameters that control where and when to push

        repo_id (`str`):
            Hub repo to push to, `user/name`. It is created (with `exist_ok=True`) when training begins.
        private (`bool`, *optional*, defaults to `True`):
            Whether a created repo is private.
        strategy (`str`, *optional*, defaults to `"end"`):
            When to push besides the end of training: `"end"` (only then), `"epoch"` (after every epoch) or
            `"checkpoint"` (after every checkpoint the trainer saves, following `save_strategy`).
        token (`str`, *optional*):
            Hub token with write access. Defaults to `HF_TOKEN` or the token saved by `hf auth login`. It is sent
            to the Hub only, never logged or written to a file.
        endpoint (`str`, *optional*):
            Hub URL. Defaults to `HF_ENDPOINT` or https://huggingface.co.

        > Parameters that control timeouts and retries

        timeout (`float`, *optional*):
            Seconds each request may take to connect, and each read or write to make progress. Defaults to
            `IA3_TRAINER_HUB_TIMEOUT` or 60. It applies to huggingface_hub's shared HTTP client (see
            `bound_hub_requests`).
        max_retries (`int`, *optional*, defaults to `3`):
            How many times a push that failed for a transient reason is tried again.
        backoff_seconds (`float`, *optional*, defaults to `2.0`):
            Wait before the first retry; each further retry waits twice as long.

    Attributes:
        pushed_commits (`list[str]`): URL of each commit made, in push order.
        failures (`list[str]`): one message per push that failed for good or was not waited for.
        wait_limit (`float`): `5 × timeout`, how long the end of `ia3-trainer train` waits for pushes.

    Example:

    >>> callback = PushAdapterToHubCallback("alice/flan-t5-small-ia3-phrasebank", strategy="epoch")
    >>> trainer = Seq2SeqTrainer(model=peft_model, args=args, train_dataset=train, processing_class=tokenizer)
    >>> trainer.add_callback(callback)
    >>> trainer.train()
    >>> callback.wait(timeout=callback.wait_limit)  # True once every push is done
    True
    """

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = True,
        strategy: Literal["end", "epoch", "checkpoint"] = "end",
        token: str | None = None,
        endpoint: str | None = None,
        timeout: float | None = None,
        max_retries: int = 3,
        backoff_seconds: float = 2.0,
    ):
        if not isinstance(repo_id, str):
            raise TypeError(f"hub.repo_id: expected a str such as 'user/name', got {type(repo_id).__name__}")
        problem = check_repo_id(repo_id)  # the check a recipe's hub section makes
        if problem:
            raise ValueError(f"hub.repo_id: {problem}")
        if strategy not in STRATEGIES:
            raise ValueError(f"hub.strategy: {strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}")
        if max_retries < 0:
            raise ValueError(f"max_retries: must be 0 or more, got {max_retries}")
        if backoff_seconds < 0:
            raise ValueError(f"backoff_seconds: must be 0 or more, got {backoff_seconds}")
        self.repo_id = repo_id
        self.private = private
        self.strategy = strategy
        self.endpoint = endpoint
        self.timeout = request_timeout(timeout)
        self.wait_limit = WAIT_FACTOR * self.timeout
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self._token = token
        self.pushed_commits: list[str] = []
        self.failures: list[str] = []
        self._output_dir: Path | None = None
        self._epoch_step: int | None = None  # the step whose checkpoint on_save pushes as an epoch's adapter
        self._offline_told = False
        # One daemon thread runs the queued Hub calls in order, so pushes reach the Hub one at a time; being a
        # daemon, it never keeps the interpreter alive (see _at_exit for the bounded wait there).
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._worker: threading.Thread | None = None
        self._pending: list[tuple[Future, str, Path | None]] = []  # (future, what it does, its staging folder)
        self._staging: set[Path] = set()  # staging folders not removed yet
        self._stop = threading.Event()
        self._exit_hook = False

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}(repo_id={self.repo_id!r}, strategy={self.strategy!r})"

    @property
    def pending(self) -> list[str]:
        """What each push not yet done does, in order (e.g. `"Upload final adapter (step 40)"`)."""
        with self._lock:
            return [what for future, what, _ in self._pending if not future.done()]

    # Every Hub call and every file the callback writes happens on the main process only
    # (trl's merge_model_callback lacks this guard).

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise TypeError(
                f"PushAdapterToHubCallback pushes a peft.PeftModel's adapter, but the trainer's model is a "
                f"{type(model).__name__}; wrap it with peft.get_peft_model(model, peft.IA3Config(...)) first"
            )
        self._output_dir = Path(args.output_dir)
        self._stop.clear()
        if self.strategy == "checkpoint" and args.save_strategy == "no":
            logger.warning(
                "hub.strategy is 'checkpoint' but save_strategy is 'no', so only the final adapter will be pushed"
            )
        self._offline_told = False
        if hub_offline():  # the one error that cannot be transient: say so once, attempt nothing, retry nothing
            self._tell_offline()
        else:
            self._submit("create the repo", None, self._create_repo)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.strategy == "checkpoint":
            message = f"Upload adapter at step {state.global_step} (epoch {state.epoch:.2f})"
        elif self.strategy == "epoch" and self._epoch_step == state.global_step:
            message = f"Upload adapter at epoch {round(state.epoch)} (step {state.global_step})"
        else:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not (folder / "adapter_config.json").is_file():
            logger.warning(f"{folder} holds no adapter_config.json; skipping the push of step {state.global_step}")
            return
        self._push(message, args, state, folder=folder)

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero or self.strategy != "epoch":
            return
        if control.should_save:
            # The trainer saves a checkpoint at this step right after this event (save_strategy "epoch"): push that
            # folder from on_save, whole with the recipe.json and inference.json the trainer writes beside it.
            self._epoch_step = state.global_step
            return

        # Else save a snapshot of the adapter straight into the staging folder.
        def save(staging: Path) -> None:
            model.save_pretrained(staging)
            if processing_class is not None:
                processing_class.save_pretrained(staging)

        message = f"Upload adapter at epoch {round(state.epoch)} (step {state.global_step})"
        self._push(message, args, state, save=save)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir)
        if not getattr(args, "save_final_adapter", False):
            # A plain Seq2SeqTrainer: save the final adapter here (main process only), with our card, not peft's.
            # IA3Seq2SeqTrainer saved it just before this, every process taking part (FSDP and ZeRO-3 gather the
            # sharded IA3 vectors), and wrote the card itself.
            model.save_pretrained(folder)
            if processing_class is not None:
                processing_class.save_pretrained(folder)
            write_model_card(folder, repo_id=self.repo_id, metrics=card_metrics(state.log_history))
        self._push(f"Upload final adapter (step {state.global_step})", args, state, folder=folder, final=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every push made so far is done (it succeeded, or its failure is in `failures`), or until
        `timeout` seconds have passed. Returns whether every push is done.

        Without `timeout` the wait is still bounded: each request has its timeout and each push a fixed number of
        attempts. Ctrl-C interrupts it (`KeyboardInterrupt`); call [`cancel`] then to stop the pushes.
        """
        with self._lock:
            futures = [future for future, _, _ in self._pending]
        _, not_done = wait_for_futures(futures, timeout=timeout)
        with self._lock:
            self._pending = [entry for entry in self._pending if not entry[0].done()]
        return not not_done

    def cancel(self, reason: str = "Stopped waiting") -> str | None:
        """Give up on the pushes not done: queued ones never start, one under way makes no new attempt (the process
        may exit while it runs), and the interpreter does not wait for them at exit. Returns one line saying what did
        not reach the Hub and how to push it later (also added to `failures`), or None when every push was done."""
        self._stop.set()
        with self._lock:
            unfinished, self._pending = [entry for entry in self._pending if not entry[0].done()], []
        for future, _, staging in unfinished:
            if future.cancel() and staging is not None:
                self._remove(staging)
        pushes = [what for _, what, staging in unfinished if staging is not None]
        if not pushes:
            return None
        folder = self._output_dir or Path(".")
        text = self._redact(
            f"{reason}: {len(pushes)} push(es) to Hub repo {self.repo_id} did not finish ({'; '.join(pushes)}). "
            f"The adapter is saved in {folder}; push it later with: ia3-trainer push {folder} {self.repo_id}"
        )
        self.failures.append(text)
        return text

    # -- local side (the main process, during training) ------------------------------------------------------

    def _push(self, message: str, args, state, folder: Path | None = None, save=None, final: bool = False) -> None:
        """Stage a copy of the adapter (never writing into `folder`) and hand its upload to the background thread."""
        where = folder if final else Path(args.output_dir)
        if hub_offline():
            self._tell_offline()
            return
        metrics = {"global_step": state.global_step, "epoch": state.epoch, "metrics": _latest(state.log_history),
                   "log_history": state.log_history}
        staging = stage_adapter(folder, self.repo_id, metrics=metrics, results=card_metrics(state.log_history),
                                save=save, recipe_folder=_run_files(Path(args.output_dir)))
        with self._lock:
            self._staging.add(staging)
        self._submit(message, staging, self._upload, staging, message, where, final)

    def _tell_offline(self) -> None:
        if self._offline_told:
            return
        self._offline_told = True
        folder = self._output_dir or Path(".")
        text = (f"HF_HUB_OFFLINE is set, so nothing is pushed to Hub repo {self.repo_id} in this run; after training, "
                f"push the adapter (with HF_HUB_OFFLINE unset) with: ia3-trainer push {folder} {self.repo_id}")
        self.failures.append(text)
        logger.warning(text)

    def _remove(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        with self._lock:
            self._staging.discard(staging)

    # -- Hub side (the background thread) --------------------------------------------------------------------

    def _submit(self, what: str, staging: Path | None, fn, *args) -> None:
        future: Future = Future()
        with self._lock:
            self._pending.append((future, what, staging))
            self._queue.append((future, fn, args))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="ia3-trainer-push", daemon=True)
                self._worker.start()
            if not self._exit_hook:
                atexit.register(self._at_exit)
                self._exit_hook = True

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                future, fn, args = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # a bug, not a Hub failure (those are reported in _upload)
                logger.error(self._redact(f"Push to Hub repo {self.repo_id} failed: {one_line(err)}"))
                future.set_exception(err)

    def _create_repo(self) -> None:
        # Early, so that a wrong token or a missing permission shows up when training starts. Each push creates
        # the repo again if needed, so a failure here is only a warning.
        from huggingface_hub import HfApi

        try:
            bound_hub_requests(self.timeout)
            api = HfApi(endpoint=self.endpoint, token=self._token, library_name="ia3-trainer",
                        library_version=__version__)
            api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        except Exception as err:
            reason = describe_push_error(err, timeout=self.timeout, token=self._token)
            logger.warning(self._redact(
                f"Could not create Hub repo {self.repo_id} yet ({reason}); each push will try again"
            ))

    def _upload(self, staging: Path, message: str, where: Path, final: bool) -> None:
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    commit = upload_staged(
                        staging, self.repo_id, private=self.private, token=self._token, endpoint=self.endpoint,
                        commit_message=message, timeout=self.timeout,
                    )
                except Exception as err:
                    if self._stop.is_set():  # cancel() reported this push already
                        return
                    reason = describe_push_error(err, timeout=self.timeout, token=self._token)
                    if attempt < self.max_retries and _is_transient(err):
                        delay = self.backoff_seconds * 2**attempt
                        logger.info(self._redact(f"{message} failed ({reason}); retrying in {delay:g} s"))
                        if not self._stop.wait(delay):
                            continue
                        return
                    self._report_failure(message, reason, where, final, attempts=attempt + 1)
                    return
                self.pushed_commits.append(commit.commit_url)
                logger.info(f"{message}: {commit.commit_url}")
                return
        finally:
            self._remove(staging)

    def _report_failure(self, message: str, reason: str, where: Path, final: bool, attempts: int) -> None:
        tried = f" after {attempts} attempt(s)" if attempts else ""
        saved = "The adapter is saved in" if final else "Training goes on; the final adapter will be saved in"
        advice = f"{saved} {where}; push it later with: ia3-trainer push {where} {self.repo_id}"
        text = self._redact(f"Could not push to Hub repo {self.repo_id} ({message}){tried}: {reason}. {advice}")
        self.failures.append(text)
        logger.error(text)

    def _at_exit(self) -> None:
        """At interpreter exit: wait at most `wait_limit` seconds for pushes nobody waited for (not at all when the
        program ends on Ctrl-C), then remove what they staged. Never blocks for ever: the worker is a daemon thread."""
        try:
            if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):  # the program ends on a Ctrl-C
                raise KeyboardInterrupt
            pending = self.pending
            if pending and not self._stop.is_set():
                what, limit = "; ".join(pending), self.wait_limit
                logger.warning(f"Waiting up to {limit:g} s for Hub repo {self.repo_id}: {what} (Ctrl-C stops waiting)")
                if not self.wait(self.wait_limit):
                    logger.error(self.cancel(f"Stopped waiting after {self.wait_limit:g} s") or "")
        except KeyboardInterrupt:
            line = self.cancel("Interrupted")
            if line:
                logger.error(line)
        finally:
            for staging in list(self._staging):
                self._remove(staging)

    def _redact(self, text: str) -> str:
        # Error messages come from the server and from httpx; make sure none of them can carry the token out.
        return redact(text, self._token)


def _allowed(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in ADAPTER_FILE_PATTERNS)


def _run_files(output_dir: Path) -> Path:
    """Where a snapshot finds its run's recipe.json and inference.json: the newest checkpoint-N holding them (the
    run's own: a run owns its output_dir), else output_dir."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if suffix.isdigit() and (path / INFERENCE_FILE).is_file():
            steps.append((int(suffix), path))
    return max(steps)[1] if steps else output_dir


def _latest(log_history: list[dict]) -> dict:
    latest: dict[str, Any] = {}
    for entry in log_history:
        latest.update(entry)
    return latest


def _is_offline_error(err: BaseException) -> bool:
    from huggingface_hub import errors

    offline = getattr(errors, "OfflineModeIsEnabled", None)
    return offline is not None and isinstance(err, offline)


def _is_timeout(err: BaseException) -> bool:
    # httpx's (and httpx2's) TimeoutException is no TimeoutError; its name is the same in both.
    return isinstance(err, TimeoutError) or any(cls.__name__ == "TimeoutException" for cls in type(err).__mro__)


def _is_transient(err: BaseException) -> bool:
    """Whether trying the same push again may work: network trouble or a server-side error, not a refusal."""
    from huggingface_hub.errors import HfHubHTTPError

    if _is_offline_error(err):
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
