"""[`PushAdapterToHubCallback`]: push the adapter to the Hugging Face Hub while a Trainer trains, in the background.

Each push stages a copy of the adapter and uploads it with `ia3_trainer.hub.upload` (allow-list, timeouts, redaction)
on one daemon thread: training never waits for the Hub, and the interpreter never waits for it for ever.
"""

import atexit
import logging
import shutil
import sys
import threading
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Literal

# The base class must exist when the class statement runs, so transformers is imported with this module (about 3 s,
# torch included); `cli` and `trainer` import this module only where they need it.
from transformers import TrainerCallback

from ia3_trainer.errors import one_line, redact
from ia3_trainer.hub.model_card import card_metrics, latest_metrics, write_model_card
from ia3_trainer.hub.upload import create_repo, describe_push_error, is_transient, stage_adapter, upload_staged
from ia3_trainer.layout import INFERENCE_FILE, checkpoint_folders
from ia3_trainer.network import hub_offline, request_timeout
from ia3_trainer.recipe.loading import check_repo_id


logger = logging.getLogger(__name__)

STRATEGIES = ("end", "epoch", "checkpoint")
WAIT_FACTOR = 5  # the end of `ia3-trainer train` (and of the interpreter) waits at most this many request timeouts


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

    Each push is handed to the background thread and the call returns. A recipe's run (`ia3-trainer train`,
    `IA3Seq2SeqTrainer.from_recipe(...).train()`) waits for them after writing its results (at most `wait_limit`
    seconds, saying so). Otherwise call [`~PushAdapterToHubCallback.wait`]; a push still running when the
    interpreter exits is waited for at most `wait_limit` seconds, with a warning, and Ctrl-C stops that wait.

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
            `ia3_trainer.network.bound_hub_requests`).
        max_retries (`int`, *optional*, defaults to `3`):
            How many times a push that failed for a transient reason is tried again.
        backoff_seconds (`float`, *optional*, defaults to `2.0`):
            Wait before the first retry; each further retry waits twice as long.

        save_final (`bool`, *optional*, defaults to `True`):
            Whether `on_train_end` saves the trained adapter into `output_dir` (main process) and pushes it, as any
            Trainer needs. `False`: the trainer saves it, then calls [`~PushAdapterToHubCallback.push_final_adapter`]
            ([`IA3Seq2SeqTrainer`] built from a recipe does, every process taking part, as sharded models need).

    Attributes:
        pushed_commits (`list[str]`): URL of each commit made, in push order.
        final_commit (`str` or `None`): URL of the commit of the final adapter, once made.
        failures (`list[str]`): one message per push that failed for good or was not waited for.
        wait_limit (`float`): `5 × timeout`, how long the end of a recipe's run waits for pushes.

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
        save_final: bool = True,
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
        self.repo_id, self.private, self.strategy, self.endpoint = repo_id, private, strategy, endpoint
        self.timeout = request_timeout(timeout)
        self.wait_limit = WAIT_FACTOR * self.timeout
        self.max_retries, self.backoff_seconds, self.save_final = max_retries, backoff_seconds, save_final
        self._token = token
        self.pushed_commits: list[str] = []
        self.final_commit: str | None = None
        self.failures: list[str] = []
        self._output_dir: Path | None = None
        self._epoch_step: int | None = None  # the step whose checkpoint on_save pushes as an epoch's adapter
        self._offline_told = False
        # One daemon thread runs the queued Hub calls in order (one push at a time); a daemon never keeps the
        # interpreter alive (see _at_exit for the bounded wait there).
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

    # Every Hub call and every file the callback writes happens on the main process only (trl's lacks this guard).

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
            logger.warning("hub.strategy is 'checkpoint' but save_strategy is 'no': only the final adapter is pushed")
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
        self._push(message, args.output_dir, state, folder=folder)

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
            model.save_pretrained(staging, save_embedding_layers=False)  # IA3 adapts none; "auto" asks the Hub
            if processing_class is not None:
                processing_class.save_pretrained(staging)

        message = f"Upload adapter at epoch {round(state.epoch)} (step {state.global_step})"
        self._push(message, args.output_dir, state, save=save)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero and self.save_final:  # save it here (main process), with our card
            model.save_pretrained(args.output_dir, save_embedding_layers=False)  # IA3 adapts none; "auto" asks the Hub
            if processing_class is not None:
                processing_class.save_pretrained(args.output_dir)
            write_model_card(args.output_dir, repo_id=self.repo_id, metrics=card_metrics(state.log_history))
            self.push_final_adapter(args.output_dir, state)

    def push_final_adapter(self, folder: str | Path, state) -> None:
        """Push `folder`, the final adapter a trainer saved, at `state` (its step and metrics); main process only."""
        if state.is_world_process_zero:
            self._push(f"Upload final adapter (step {state.global_step})", folder, state, Path(folder), final=True)

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

    def _push(self, message: str, output_dir, state, folder: Path | None = None, save=None, final=False) -> None:
        """Stage a copy of the adapter (never writing into `folder`) and hand its upload to the background thread."""
        where = folder if final else Path(output_dir)
        if hub_offline():
            self._tell_offline()
            return
        history = state.log_history
        metrics = {"global_step": state.global_step, "epoch": state.epoch, "metrics": latest_metrics(history),
                   "log_history": history}
        # A snapshot shows the recipe.json and inference.json of the newest checkpoint-N that has them (the run's
        # own: a run owns its output_dir), else of output_dir.
        run_files = next((path for path in checkpoint_folders(output_dir) if (path / INFERENCE_FILE).is_file()),
                         Path(output_dir))
        try:
            staging = stage_adapter(folder, self.repo_id, metrics=metrics, results=card_metrics(history), save=save,
                                    recipe_folder=run_files)
        except Exception as err:  # on the training thread: a full /tmp or a card error must not stop training
            reason = f"could not stage a copy to upload: {describe_push_error(err, token=self._token)}"
            self._report_failure(message, reason, where, final, attempts=0)
            return
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
        # Early, so that a wrong token shows up when training starts; each push creates it if needed: a warning.
        try:
            create_repo(self.repo_id, private=self.private, token=self._token, endpoint=self.endpoint,
                        timeout=self.timeout)
        except Exception as err:
            reason = describe_push_error(err, timeout=self.timeout, token=self._token)
            logger.warning(self._redact(f"Could not create Hub repo {self.repo_id} yet ({reason}); each push will try "
                                        "again"))

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
                    if attempt < self.max_retries and is_transient(err):
                        delay = self.backoff_seconds * 2**attempt
                        logger.info(self._redact(f"{message} failed ({reason}); retrying in {delay:g} s"))
                        if not self._stop.wait(delay):
                            continue
                        return
                    self._report_failure(message, reason, where, final, attempts=attempt + 1)
                    return
                self.pushed_commits.append(commit.commit_url)
                self.final_commit = commit.commit_url if final else self.final_commit
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

