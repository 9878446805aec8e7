"""Checkpoints that are whole or absent, finding the newest one to resume from, and saves staged the same way.

transformers 5.24 `Trainer._save_checkpoint` writes `checkpoint-N` in place: adapter, then optimizer and scheduler,
then RNG states, then `trainer_state.json`. A crash, `SIGKILL` or preempted node during a save leaves a
`checkpoint-N` folder that `get_last_checkpoint` takes for whole, and resuming from it fails or, worse, resumes
from a half-written optimizer. [`IA3Seq2SeqTrainer`] therefore lets Trainer write into `tmp-checkpoint-N/` and
renames the finished folder to `checkpoint-N` once every process is done: a rename is atomic on one filesystem,
so `checkpoint-N` exists only when it is whole. (transformers 4.36 did the same and reverted it in 4.37 because
every process renamed; here only the process that saves does, after a barrier.) The final save is staged too
(`AtomicCheckpoints.staged`): a full disk leaves the previous adapter and the metadata that describes it as they were.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ia3_trainer.errors import ProcessesDisagreeError, RunFolderError, first_line
from ia3_trainer.layout import (
    METADATA_FILES,
    STAGING_PREFIX,
    checkpoint_damage,
    checkpoint_folders,
    checkpoint_step,
    publish,
)


logger = logging.getLogger(__name__)

_TORCH_WRITER = ("inline_container", "PytorchStreamWriter")  # what torch.save's write failures name


def last_checkpoint(output_dir: str | Path, accelerator=None) -> str | None:
    """The newest whole `checkpoint-N` folder in `output_dir`, or None.

    Whole is what `checkpoint_damage` finds nothing wrong with. Every checkpoint this package writes is whole when
    written; the check skips folders that a crash left behind when they were written in place (older versions, a
    plain `Trainer`) or that a disk damaged later, with a warning naming each and why.

    With an `accelerator` of several processes (every process must call it then), each process looks in its own
    `output_dir` (machines need not share a disk) and all agree on the newest step whole for every one of them: a
    machine lost between its save and another's leaves them a step apart, and processes that resumed from different
    steps would train different models. When some processes have a checkpoint and others none (a machine that does
    not share the disk and saved none: `training.save_on_each_node` false), every process raises the same
    `ProcessesDisagreeError`.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return next((str(path) for path in _whole_checkpoints(output_dir)), None)
    from accelerate.utils import gather_object

    mine = {checkpoint_step(path): path for path in _whole_checkpoints(output_dir)}
    found = gather_object([sorted(mine, reverse=True)])  # one list of steps per process, in process order
    common = set.intersection(*map(set, found))
    if common:
        step = max(common)
        if step != max(mine):
            logger.warning("Resuming from step %d, the newest checkpoint every process has; %s is newer here",
                           step, mine[max(mine)])
        return str(mine[step])
    if not any(found):
        return None
    newest = {}  # newest step (None: no checkpoint) -> the processes that have it
    for rank, steps in enumerate(found):
        newest.setdefault(steps[0] if steps else None, []).append(rank)
    have = ", ".join(f"{_processes(ranks)}: " + ("none" if step is None else f"checkpoint-{step}")
                     for step, ranks in newest.items())
    raise ProcessesDisagreeError(
        key="training.output_dir",
        problem=f"no checkpoint in {output_dir} that every process has, to resume from ({have})",
        fix="each machine reads its own disk: set training.save_on_each_node to true when machines do not share one "
            "(or put training.output_dir on a shared filesystem), or train() without resume_from_checkpoint to "
            "start over",
    )


def _whole_checkpoints(output_dir: str | Path):
    for path in checkpoint_folders(output_dir):
        problem = checkpoint_damage(path)
        if problem is None:
            yield path
        else:
            logger.warning("Skipping %s: %s; it cannot be resumed from", path, problem)


def _processes(ranks: list[int]) -> str:
    """`process 1`, `processes 8-15` (contiguous), `processes 1, 3`."""
    if len(ranks) == 1:
        return f"process {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"processes {ranks[0]}-{ranks[-1]}"
    return "processes " + ", ".join(map(str, ranks))


class AtomicCheckpoints:
    """Writes each `checkpoint-N` whole or not at all, and stages final saves; [`IA3Seq2SeqTrainer`] holds one.

    While a checkpoint is being written, Trainer must take its staging folder for the run folder:
    `IA3Seq2SeqTrainer._get_output_dir` asks `staging_root` (None between saves).
    """

    def __init__(self):
        self.staging_root: str | None = None

    def save(self, trainer, trial, save) -> None:
        """Run `save()` (Trainer's `_save_checkpoint`) into a staging folder, then publish it as `checkpoint-N`.

        Every process writes its part (its RNG state, its shard under FSDP or DeepSpeed) into the staging folder;
        after a barrier each process that saves (one, or one per machine with `save_on_each_node`) renames it, and
        after the next one rotates old checkpoints as Trainer would have. A process that saves nothing removes what it
        staged if it is still there (its machine's own disk).
        """
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        args, state = trainer.args, trainer.state
        run_dir = trainer._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staging_root, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        staged = os.path.join(staging_root, name)
        if args.should_save:  # a crash during an earlier save of this step left it
            shutil.rmtree(staging_root, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        self.staging_root = staging_root
        try:
            with saving(final):
                save()
        finally:
            self.staging_root = None
        trainer.accelerator.wait_for_everyone()
        # Trainer saw the staging folder as the run folder, so a best checkpoint saved just now has its staging path.
        moved_best = state.best_model_checkpoint == staged
        if moved_best:
            state.best_model_checkpoint = final
        if args.should_save:
            if moved_best:
                state.save_to_json(os.path.join(staged, "trainer_state.json"))
            # Resumed from an older checkpoint and reached this step again: the old checkpoint-N is swapped for the
            # new one, never removed first (a crash in between would leave neither).
            publish(staged, final)
            os.rmdir(staging_root)
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            # Old checkpoints go only once every machine has published this one (training.save_on_each_node): a
            # machine lost before its rename leaves an older step that every machine still has, for `--resume`.
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=args.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint, use_mtime=_mtimes_order(run_dir),
            )
        else:
            # Every process wrote its RNG state into the staging folder. On a shared disk the saving process has
            # moved it by now; on a machine with its own disk that saves nothing (training.save_on_each_node false) no
            # process would, and a tmp-checkpoint-N would be left there at each save.
            shutil.rmtree(staging_root, ignore_errors=True)

    @contextlib.contextmanager
    def staged(self, output_dir: str | Path, name: str = "save") -> Iterator[Path]:
        """A folder to save into in place of `output_dir`: when the block ends, its entries replace those of
        `output_dir`, the adapter first and `recipe.json`, `inference.json` and the card last; when it fails (a full
        disk), `output_dir` is left as it was. Inside a checkpoint save (staged whole already) it is `output_dir`
        itself.
        """
        output_dir = Path(output_dir)
        if self.staging_root is not None:
            yield output_dir
            return
        staging = output_dir / f"{STAGING_PREFIX}{name}"
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
        try:
            with saving(output_dir):
                staging.mkdir(parents=True)
                yield staging
                last = {name: rank for rank, name in enumerate(METADATA_FILES, start=1)}
                for entry in sorted(staging.iterdir(), key=lambda path: (last.get(path.name, 0), path.name)):
                    publish(entry, output_dir / entry.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def saving(folder: str | Path) -> Iterator[None]:
    """Turn a failure to write a save (a full disk, a file size limit, a read-only folder) into one
    [`RunFolderError`] (an `OSError`) that names the folder and says what to do; other errors pass unchanged. Not
    every writer raises `OSError`: torch's zip
    writer raises `RuntimeError` (from `inline_container.cc`), and the Rust writers of safetensors and tokenizers
    raise their own errors, which end in the system's "(os error N)"."""
    try:
        yield
    except Exception as error:
        text = str(error)
        torch_writer = isinstance(error, RuntimeError) and any(name in text for name in _TORCH_WRITER)
        written = isinstance(error, OSError) or torch_writer or re.search(r"\(os error \d+\)", text) is not None
        if not written:
            raise
        raise RunFolderError(
            problem=f"could not save to {folder}: {first_line(error)}",
            fix="what was there before is unchanged: free some disk space, then resume the run "
                "(train(resume_from_checkpoint=True))",
        ) from error


def _mtimes_order(run_dir: str) -> bool:
    """Whether the checkpoints' modification times order them, as Trainer orders them before it rotates: when they
    span a second or more. Saves closer together than that (a small model) are ordered by step, which Trainer also
    falls back to, there with a warning the user can do nothing about."""
    times = [os.path.getmtime(path) for path in checkpoint_folders(run_dir) if path.is_dir()]
    return len(times) > 1 and max(times) - min(times) >= 1.0
