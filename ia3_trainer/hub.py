"""Push the IA3 adapter to the Hugging Face Hub while a [`~transformers.Seq2SeqTrainer`] trains."""

import fnmatch
import json
import logging
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

# The base class must exist when the class statement runs, so transformers is imported with this module (about 3 s,
# torch included); `cli` imports this module only inside the commands that push.
from transformers import TrainerCallback

from ._schema import read_json
from .errors import one_line, redact, shorten
from .model_card import write_model_card
from .recipe import check_repo_id


logger = logging.getLogger(__name__)

STRATEGIES = ("end", "epoch", "checkpoint")
_BOOKKEEPING = {"step", "learning_rate", "grad_norm", "total_flos"}

# Everything a pushed adapter repo holds. Anything else in the folder (base weights, optimizer.pt, scheduler.pt,
# rng_state*.pth, training_args.bin, trainer_state.json) stays local: upload_folder gets this list as `allow_patterns`.
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
    "metrics.json",
    "README.md",
]


def push_adapter_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload adapter with ia3-trainer",
) -> Any:
    """Create `repo_id` if needed and upload the adapter files of `folder` to it in one commit, synchronously.

    Only the files in `ADAPTER_FILE_PATTERNS` are uploaded: never base model weights or optimizer state. This is what
    `ia3-trainer push OUTPUT_DIR REPO_ID` runs, and what [`PushAdapterToHubCallback`] runs in the background.

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

    Returns:
        [`~huggingface_hub.CommitInfo`]: the commit made (or, when no file changed, the latest one).

    Raises:
        `FileNotFoundError`: `folder` holds no `adapter_config.json`.
        [`~huggingface_hub.errors.HfHubHTTPError`]: the Hub refused a request.

    Example:

    >>> push_adapter_folder("outputs/phrasebank", "alice/flan-t5-small-ia3-phrasebank")
    CommitInfo(commit_url='https://huggingface.co/alice/flan-t5-small-ia3-phrasebank/commit/...', ...)
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: no adapter_config.json, so there is no adapter to push; pass the output_dir of a finished "
            "run or one of its checkpoint-* folders"
        )
    api = HfApi(endpoint=endpoint, token=token, library_name="ia3-trainer")
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=ADAPTER_FILE_PATTERNS, commit_message=commit_message
    )


class PushAdapterToHubCallback(TrainerCallback):
    """Push the adapter to the Hub at the end of training, and optionally after every epoch or checkpoint.

    Add it to any [`~transformers.Seq2SeqTrainer`] that trains a [`~peft.PeftModel`]. Each push first saves the
    adapter, tokenizer, `metrics.json` and a model card (`README.md`) in a local folder, then uploads a copy of
    those files in the background, so training does not wait for the Hub. Only the main process pushes.

    A push that fails is retried with exponential backoff. If it still fails, training goes on: the failure is
    logged as one line saying where the local copy is and how to push it later, and kept in `failures`. At the end
    of training, `on_train_end` waits until every push is done.

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

        > Parameters that control retries

        max_retries (`int`, *optional*, defaults to `3`):
            How many times a push that failed for a transient reason (network error, HTTP 5xx, 408, 429) is tried
            again. Other failures (such as a wrong token) are reported at once.
        backoff_seconds (`float`, *optional*, defaults to `2.0`):
            Wait before the first retry; each further retry waits twice as long.

    Attributes:
        pushed_commits (`list[str]`): URL of each commit made, in push order.
        failures (`list[str]`): one message per push that failed for good.

    Example:

    >>> trainer = Seq2SeqTrainer(model=peft_model, args=args, train_dataset=train, processing_class=tokenizer)
    >>> trainer.add_callback(PushAdapterToHubCallback("alice/flan-t5-small-ia3-phrasebank", strategy="epoch"))
    >>> trainer.train()
    """

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = True,
        strategy: Literal["end", "epoch", "checkpoint"] = "end",
        token: str | None = None,
        endpoint: str | None = None,
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
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self._token = token
        self.pushed_commits: list[str] = []
        self.failures: list[str] = []
        self._trainable_parameters: int | None = None
        # One worker: pushes reach the Hub one at a time, in the order they were made.
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}(repo_id={self.repo_id!r}, strategy={self.strategy!r})"

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
        self._trainable_parameters = model.get_nb_trainable_parameters()[0]
        if self.strategy == "checkpoint" and args.save_strategy == "no":
            logger.warning(
                "hub.strategy is 'checkpoint' but save_strategy is 'no', so only the final adapter will be pushed"
            )
        self._submit(self._create_repo)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.strategy != "checkpoint":
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not (folder / "adapter_config.json").is_file():
            logger.warning(f"{folder} holds no adapter_config.json; skipping the push of step {state.global_step}")
            return
        self._push(folder, args, state, f"Upload adapter at step {state.global_step} (epoch {state.epoch:.2f})")

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero or self.strategy != "epoch":
            return
        # on_epoch_end runs before the trainer saves that epoch's checkpoint, so save the adapter here.
        folder = self._save_adapter(Path(args.output_dir), model, processing_class)
        message = f"Upload adapter at epoch {round(state.epoch)} (step {state.global_step})"
        self._push(folder, args, state, message)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if getattr(args, "save_final_adapter", False):
            # IA3Seq2SeqTrainer saved the final adapter to output_dir just before this (every process taking part,
            # as FSDP and ZeRO-3 need to gather sharded IA3 vectors): push that folder.
            folder = Path(args.output_dir)
        else:  # a plain Seq2SeqTrainer: save a snapshot here (main process only)
            folder = self._save_adapter(Path(args.output_dir), model, processing_class)
        self._push(folder, args, state, f"Upload final adapter (step {state.global_step})")
        self.wait()

    def wait(self) -> None:
        """Block until every push made so far is done (it succeeded or its failure was reported)."""
        for future in self._pending:
            future.result()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    # -- local side ------------------------------------------------------------------------------------------

    @staticmethod
    def _save_adapter(folder: Path, model, processing_class) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        if processing_class is not None:
            processing_class.save_pretrained(folder)
        return folder

    def _push(self, folder: Path, args, state, message: str) -> None:
        """Complete `folder` (metrics, recipe, model card), copy its adapter files aside and upload the copy."""
        latest: dict[str, Any] = {}
        for entry in state.log_history:
            latest.update(entry)
        metrics = {"global_step": state.global_step, "epoch": state.epoch, "metrics": latest}
        (folder / "metrics.json").write_text(
            json.dumps({**metrics, "log_history": state.log_history}, indent=2) + "\n", encoding="utf-8"
        )
        recipe_path = folder / "recipe.json"
        if not recipe_path.is_file() and (Path(args.output_dir) / "recipe.json").is_file():
            shutil.copy2(Path(args.output_dir) / "recipe.json", recipe_path)  # a checkpoint shows its recipe too
        recipe = read_json(recipe_path) if recipe_path.is_file() else None
        # The card lists results; optimizer and speed bookkeeping stays in metrics.json.
        results = {
            name: value
            for name, value in latest.items()
            if name not in _BOOKKEEPING and not name.endswith(("_runtime", "_per_second"))
        }
        write_model_card(
            folder,
            repo_id=self.repo_id,
            metrics=results,
            recipe=recipe,
            trainable_parameters=self._trainable_parameters,
        )
        # Upload a copy: the trainer may rewrite output_dir or rotate checkpoint-* away while the upload runs.
        staging = Path(tempfile.mkdtemp(prefix="ia3-trainer-push-"))
        for path in folder.iterdir():
            if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in ADAPTER_FILE_PATTERNS):
                shutil.copy2(path, staging / path.name)
        self._submit(self._upload, folder, staging, message)

    # -- Hub side (runs in the background) -------------------------------------------------------------------

    def _submit(self, fn, *args) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ia3-trainer-push")
        self._pending.append(self._executor.submit(fn, *args))

    def _create_repo(self) -> None:
        # Early, so that a wrong token or a missing permission shows up when training starts. Each push creates
        # the repo again if needed, so a failure here is only a warning.
        from huggingface_hub import HfApi

        try:
            api = HfApi(endpoint=self.endpoint, token=self._token, library_name="ia3-trainer")
            api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        except Exception as err:
            logger.warning(
                self._redact(
                    f"Could not create Hub repo {self.repo_id} yet ({describe_push_error(err)}); training goes on "
                    "and each push will try again"
                )
            )

    def _upload(self, folder: Path, staging: Path, message: str) -> None:
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    commit = push_adapter_folder(
                        staging,
                        self.repo_id,
                        private=self.private,
                        token=self._token,
                        endpoint=self.endpoint,
                        commit_message=message,
                    )
                except Exception as err:
                    if attempt < self.max_retries and _is_transient(err):
                        delay = self.backoff_seconds * 2**attempt
                        reason = describe_push_error(err)
                        logger.info(self._redact(f"{message} failed ({reason}); retrying in {delay:g} s"))
                        time.sleep(delay)
                        continue
                    self._report_failure(folder, message, err, attempts=attempt + 1)
                    return
                self.pushed_commits.append(commit.commit_url)
                logger.info(f"{message}: {commit.commit_url}")
                return
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _report_failure(self, folder: Path, message: str, err: Exception, attempts: int) -> None:
        text = self._redact(
            f"Could not push to Hub repo {self.repo_id} ({message}) after {attempts} attempt(s): "
            f"{describe_push_error(err)}. "
            f"The adapter is saved in {folder}; push it later with: ia3-trainer push {folder} {self.repo_id}"
        )
        self.failures.append(text)
        logger.error(text)

    def _redact(self, text: str) -> str:
        # Error messages come from the server and from httpx; make sure none of them can carry the token out.
        return redact(text, self._token)


def describe_push_error(err: Exception, limit: int = 300) -> str:
    """`err` as one short line; for an HTTP error, the status, the request and the Hub's own message. Pass the
    result through `errors.redact` before showing it: a server's message can echo the request's headers."""
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(err, HfHubHTTPError):
        return one_line(err, limit)
    request = err.response.request
    text = f"HTTP {err.response.status_code} for {request.method} {request.url}"
    text += f": {err.server_message}" if err.server_message else ""
    if err.response.status_code in (401, 403):
        text += " (check that the token, HF_TOKEN or the one saved by `hf auth login`, may write to this repo)"
    return shorten(text, limit)


def _is_transient(err: Exception) -> bool:
    """Whether trying the same push again may work: network trouble or a server-side error, not a refusal."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code
        return status >= 500 or status in (408, 429)
    # A missing adapter_config.json (FileNotFoundError) or invalid card metadata (ValueError) will not fix itself.
    return not isinstance(err, (FileNotFoundError, ValueError))
