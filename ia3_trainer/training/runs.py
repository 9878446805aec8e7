"""A run owns its output folder: one run at a time (a lock), a record of which run it is (`run.json`), and the rules
for starting over and for resuming.

- A fresh run trains into a folder that is missing or empty. A folder that holds another run (its adapter,
  checkpoints, `recipe.json` or `run.json`) is refused unless `overwrite` (`--overwrite`), which first removes the
  files a run writes (`RUN_FILES`, `RUN_FOLDERS`) and leaves everything else; a folder that holds other files and no
  run is always refused.
- `run.json` records the run (an id, when and where it started, its resolved recipe), written whole before training.
- Resuming continues the run recorded in the folder, and only when the recipe is the same but for the keys that do
  not change what is trained (`ia3_trainer.training.resuming`); the changed keys are named either way. The data must be
  the same too: `run.json` keeps a fingerprint of it (`ia3_trainer.data.fingerprint`), compared once the data is
  loaded.
- The process that saves (one per machine with `save_on_each_node`) holds an exclusive `flock` on `run.lock` for
  the whole run; a second run on the folder is refused with the holder's pid, host and start. The kernel releases
  the lock when its process dies, so a run that crashed never blocks the next one.

Every process of a launch takes part in `claim_output_dir`, and all of them raise the same error when one is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from ia3_trainer.data.fingerprint import check_same_data
from ia3_trainer.errors import IA3TrainerError, RunFolderError, first_line, redact_urls
from ia3_trainer.jsonfiles import write_json
from ia3_trainer.layout import METADATA_FILES, REPORT_FILES, STAGING_PREFIX, checkpoint_damage, checkpoint_folders
from ia3_trainer.training.resuming import check_same_precision, check_same_recipe, precision, run_precision
from ia3_trainer.training.run_record import RUN_FILE, checkpoint_recipe, lock_holder, new_record, now, read_record


logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# What a run writes at the top of its output_dir (the adapter, tokenizer, metadata, model card, results, report):
# `--overwrite` removes these and the folders below, and nothing else.
RUN_FILES = frozenset({
    RUN_FILE, *METADATA_FILES, "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "training_args.bin", "trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
    "test_results.json", "predict_results.json", "metrics.json", *REPORT_FILES, "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
    "vocab.json", "vocab.txt", "merges.txt", "source.spm", "target.spm", "chat_template.jinja", "chat_template.json",
})
RUN_FOLDERS = re.compile(rf"^(checkpoint-\d+|{STAGING_PREFIX}.+|base-model|runs)$")  # runs/: TensorBoard's logs
# Entries that mean "this folder holds a run".
# A checkpoint folder, whole or still being staged (`layout.STAGING_PREFIX`).
_CHECKPOINT_FOLDER = rf"(?:{re.escape(STAGING_PREFIX)})?checkpoint-\d+"
_RUN_MARKS = re.compile(rf"^(run\.json|recipe\.json|adapter_config\.json|adapter_model\..+|{_CHECKPOINT_FOLDER})$")


@contextlib.contextmanager
def claim_output_dir(args, recipe: dict | None = None, *, resume: bool | str | None = None,
                     overwrite: bool = False) -> Iterator[RunFolder]:
    """Own `args.output_dir` for the block: refuse it when the rules above say so, else lock it; `RunFolder.begin`
    then records the run (and, with `overwrite`, first removes the previous one) right before training starts.

    Every process of a launch must call both; the processes that save (`args.should_save`) check, lock and write,
    and all raise the same error when one of them is refused. `resume` is `True` (the newest checkpoint of the
    folder), a checkpoint path, or None for a fresh run; `recipe` is the resolved recipe (`Recipe.to_dict()`), or
    None for a trainer built without one (nothing to compare then). A run claims its folder once
    (`ia3_trainer.training.lifecycle`); a second claim of a held folder, from this process too, is refused.
    """
    run = RunFolder(args.output_dir)
    error = None
    if args.should_save:
        try:
            run.open(recipe, resume=resume, overwrite=overwrite, precision=precision(args))
        except (OSError, ValueError) as caught:
            error = caught
            if not isinstance(caught, IA3TrainerError):  # the filesystem's own refusal (a read-only disk, ...)
                reason = getattr(caught, "strerror", None) or caught
                error = RunFolderError(key="training.output_dir", problem=f"cannot use {args.output_dir}: {reason}",
                                       fix="choose a folder this user can write in")
                error.__cause__ = caught
    error = _agree(error, args.world_size)
    if error is not None:
        run.abandon()
        raise error
    try:
        yield run
    finally:
        run.release()


def check_output_dir(args, recipe: dict | None = None, *, resume: bool | str | None = None,
                     overwrite: bool = False) -> None:
    """The checks of [`claim_output_dir`], read-only (nothing is locked or written): the command line makes them
    before the data and the model load, so a folder that will be refused fails at once. Every process calls it."""
    error = None
    if args.should_save:
        try:
            RunFolder(args.output_dir).check(recipe, resume=resume, overwrite=overwrite, precision=precision(args))
        except (OSError, ValueError, IA3TrainerError) as caught:
            error = caught
    error = _agree(error, args.world_size)
    if error is not None:
        raise error


def no_checkpoint_error(output_dir: str | Path) -> RunFolderError:
    """What resuming says when `output_dir` has no checkpoint (to start over in a folder that holds a run is to
    overwrite it)."""
    ours, _ = run_entries(Path(output_dir))
    again = ("set training.overwrite_output_dir and train() without resume_from_checkpoint"
             if any(_RUN_MARKS.match(name) for name in ours) else "train() without resume_from_checkpoint")
    return RunFolderError(
        key="training.output_dir", problem=f"no checkpoint to resume from in {output_dir}",
        fix=f"{again} to start over, or set training.save_strategy so that runs save checkpoints",
    )


class RunFolder:
    """One run's hold on its output folder: the lock (a file descriptor with an exclusive `flock`) and `run.json`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: int | None = None
        self._record: dict | None = None  # what `begin` writes to run.json
        self._replace = False  # whether `begin` removes the previous run's files first
        self._continuing = False  # whether this run continues the one recorded in the folder
        self._created: list[Path] = []  # the folder and lock file this run created, removed if it cannot start

    def open(self, recipe: dict | None, *, resume: bool | str | None = None, overwrite: bool = False,
             precision: str | None = None) -> None:
        """Check the folder for this run and lock it; nothing is written into it before the checks pass. Print the
        resumable keys the recipe changed, once per run (the checks before it print nothing)."""
        self.check(recipe, resume=resume, overwrite=overwrite, precision=precision)
        self._acquire()
        # Again under the lock: another run may have started in between.
        self._record, continuing, notice = self.check(recipe, resume=resume, overwrite=overwrite,
                                                      precision=precision)
        self._replace, self._continuing = overwrite and not continuing, continuing
        if notice is not None:
            print(notice)

    def check(self, recipe: dict | None, *, resume: bool | str | None = None, overwrite: bool = False,
              precision: str | None = None) -> tuple[dict, bool, str | None]:
        """Every rule of this module, read-only: raise when this run may not use the folder; else return the
        `run.json` to write, whether the run continues the folder's own, and the line naming the resumable keys the
        recipe changed (None when none did; `open` prints it)."""
        folder = self.path
        recipe = redact_urls(recipe)  # run.json keeps no credential of a data URL (compared redacted on resume)
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(key="training.output_dir", problem=f"{folder} is a file", fix="choose a folder")
        checkpoint = resume if isinstance(resume, (str, os.PathLike)) and str(resume) else None
        if checkpoint is not None:
            _check_checkpoint(Path(checkpoint))
        # Resuming continues the run of this folder; a checkpoint elsewhere starts a new run from it.
        continuing = resume is True or (checkpoint is not None
                                        and Path(checkpoint).resolve().parent == folder.resolve())
        if continuing and not checkpoint_folders(folder):
            raise no_checkpoint_error(folder)
        if not continuing:
            check_fresh(folder, overwrite)
        record = read_record(folder)
        if continuing:
            saved = redact_urls(record.get("recipe")) if record else None  # a run.json may lack it (_read_record)
            if saved is None:
                saved = checkpoint_recipe(checkpoint_folders(folder))
            # The precision first: bf16 and fp16 are resumable keys, which check_same_recipe names as changed.
            check_same_precision(run_precision(record, saved), precision, saved, recipe, folder)
            notice = check_same_recipe(saved, recipe, folder)
            record = {**(record or new_record(None, precision)), "recipe": recipe}
            record.setdefault("precision", precision)  # a run.json from before precision was recorded
            record["resumed"] = [*record.get("resumed", []), now()]
            return record, True, notice
        notice = None
        if checkpoint is not None:  # a new run that starts from another run's checkpoint: the same rules
            saved = checkpoint_recipe([Path(checkpoint)])
            earlier = run_precision(read_record(Path(checkpoint).parent), saved)
            check_same_precision(earlier, precision, saved, recipe, Path(checkpoint))
            notice = check_same_recipe(saved, recipe, Path(checkpoint))
        return new_record(recipe, precision), False, notice

    def begin(self, args, data=None) -> None:
        """Right before training (once the data and the model loaded): refuse continuing the run on other data than
        it trained on; with `overwrite`, remove the previous run's files; then write `run.json` with the data's
        fingerprint, whole or not at all. `data` returns the fingerprint (`fingerprint.data_fingerprint`), called by
        the processes that save only. Every process calls `begin`; the second call does nothing."""
        error = None
        if self._record is not None:
            try:
                fingerprint = data() if data is not None else None
                if self._continuing:
                    check_same_data(self._record.get("data"), fingerprint, self._record.get("recipe"), self.path)
                if fingerprint is not None:
                    self._record["data"] = fingerprint
                if self._replace:
                    _remove_run_files(self.path)
                write_json(self.path / RUN_FILE, self._record)
            except OSError as caught:
                error = caught if isinstance(caught, RunFolderError) else _not_written(caught, self.path / RUN_FILE)
            except (ValueError, IA3TrainerError) as caught:
                error = caught
            self._record = None
        error = _agree(error, args.world_size)
        if error is not None:
            self.abandon()
            raise error

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the folder rules still apply
            return
        lock_file = self.path / LOCK_FILE
        created = [path for path in (*reversed(self.path.parents), self.path, lock_file) if not path.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _not_written(error, lock_file) from error
        self._created = created
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # a filesystem without locks
                logger.warning("Cannot lock %s (%s); make sure no other run uses it", self.path, error.strerror)
                return
            raise RunFolderError(
                key="training.output_dir",
                problem=f"{self.path} is in use by another run ({lock_holder(self.path / LOCK_FILE)})",
                fix="wait for it to end, or choose another training.output_dir",
            ) from None
        self._lock = descriptor
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as error:
            raise _not_written(error, lock_file) from error

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def abandon(self) -> None:
        """Release the folder of a run that could not start, removing the lock file and the folders it created (a
        full disk must not leave a `run.lock` behind in a folder that held nothing)."""
        if self._lock is not None:
            for path in reversed(self._created):  # the lock file first, then the folders, innermost first
                with contextlib.suppress(OSError):  # a folder that holds something now stays
                    path.unlink() if path.name == LOCK_FILE and path.parent == self.path else path.rmdir()
        self._created = []
        self.release()


def _not_written(error: OSError, path: Path) -> RunFolderError:
    """A failure to write the run's own files at its start (a full disk, a read-only folder), naming the file."""
    where = error.filename or path
    return RunFolderError(
        key="training.output_dir", problem=f"cannot write {where} ({error.strerror or first_line(error)})",
        fix="make room on that disk or make the folder writable, or choose another training.output_dir, then train "
            "again")


def _agree(error: BaseException | None, world_size: int) -> BaseException | None:
    """This process's error, else the first error of any process (so that every process stops, none waits)."""
    if world_size <= 1:
        return error
    from accelerate.utils import gather_object

    errors = gather_object([error])
    return error or next((other for other in errors if other is not None), None)


def _check_checkpoint(checkpoint: Path) -> None:
    if not checkpoint.exists():
        raise RunFolderError(
            key="training.resume_from_checkpoint", problem=f"no such folder {checkpoint}",
            fix="give a checkpoint-N folder, or train(resume_from_checkpoint=True) to continue from the newest "
                "checkpoint in training.output_dir",
        )
    problem = checkpoint_damage(checkpoint)
    if problem is not None:
        raise RunFolderError(
            key="training.resume_from_checkpoint", problem=f"cannot resume from {checkpoint}: {problem}",
            fix="give a whole checkpoint-N folder, or train(resume_from_checkpoint=True) to take the newest whole one",
        )


def run_entries(folder: Path) -> tuple[list[str], list[str]]:
    """The entries of `folder` that a run writes, and the others (the lock file is neither)."""
    if not folder.is_dir():
        return [], []
    names = sorted(entry.name for entry in folder.iterdir() if entry.name != LOCK_FILE)
    ours = [name for name in names if name in RUN_FILES or RUN_FOLDERS.match(name)]
    return ours, [name for name in names if name not in ours]


def check_fresh(folder: Path, overwrite: bool) -> None:
    """Raise [`RunFolderError`] unless a fresh run may train into `folder`: new or empty, or holding another run
    and `overwrite`; never a checkpoint or a folder inside another run (`--overwrite` of that run would remove it)."""
    owner = _owning_run(folder)
    if owner is not None:
        raise RunFolderError(
            key="training.output_dir", problem=f"{folder} is {owner}; a run trains into a folder of its own, never a "
            "checkpoint or a folder inside another run (overwriting applies to a run's own output folder only)",
            fix="choose another training.output_dir")
    ours, others = run_entries(folder)
    holds_run = any(_RUN_MARKS.match(name) for name in ours)
    if not holds_run and (ours or others):
        raise RunFolderError(
            key="training.output_dir",
            problem=f"{folder} holds files that are not a training run's ({_some(others or ours)})",
            fix="a run trains into a new or empty folder and owns it: choose another training.output_dir",
        )
    if holds_run and not overwrite:
        resumable = ", train(resume_from_checkpoint=True) to continue it" if checkpoint_folders(folder) else ""
        raise RunFolderError(
            key="training.output_dir", problem=f"{folder} holds another run ({_describe_run(folder)})",
            fix=f"set training.overwrite_output_dir to replace it{resumable}, or choose another training.output_dir",
        )


def _owning_run(folder: Path) -> str | None:
    """What makes `folder` part of another run rather than a run's own output folder (a `checkpoint-N` folder of a
    run, or a folder inside a folder that holds a run's `run.json`), or None."""
    folder = folder.resolve()
    if re.fullmatch(_CHECKPOINT_FOLDER, folder.name) and (
            (folder / "trainer_state.json").is_file() or any(_RUN_MARKS.match(name) for name in run_entries(
                folder.parent)[0])):
        return f"a checkpoint folder of the run in {folder.parent}"
    for parent in folder.parents:
        record = read_record(parent) if (parent / RUN_FILE).is_file() else None
        if record is not None and "run_id" in record:  # a run's record, not a recipe file named run.json
            return f"inside the run in {parent}"
    return None


def _describe_run(folder: Path) -> str:
    record = read_record(folder) or {}
    parts = []
    if isinstance(record.get("recipe"), dict) and record["recipe"].get("name"):
        parts.append(f"recipe {record['recipe']['name']!r}")
    if record.get("started"):
        parts.append(f"started {record['started']}")
    if (folder / "adapter_config.json").is_file():
        parts.append("a final adapter")
    checkpoints = checkpoint_folders(folder)
    if checkpoints:
        parts.append(f"{len(checkpoints)} checkpoint{'s' * (len(checkpoints) > 1)}, newest {checkpoints[0].name}")
    return ", ".join(parts) or "its files"


def _remove_run_files(folder: Path) -> None:
    ours, others = run_entries(folder)
    for name in ours:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if others:
        logger.warning("training.overwrite_output_dir: kept %s in %s (not files a run writes)", _some(others), folder)


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
