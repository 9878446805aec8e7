"""Checkpoints that are whole or absent, and finding the newest one to resume from.

transformers 5.24 `Trainer._save_checkpoint` writes `checkpoint-N` in place: adapter, then optimizer and scheduler,
then RNG states, then `trainer_state.json`. A crash, `SIGKILL` or preempted node during a save leaves a
`checkpoint-N` folder that `get_last_checkpoint` takes for whole, and resuming from it fails or, worse, resumes
from a half-written optimizer. [`IA3Seq2SeqTrainer`] therefore lets Trainer write into `tmp-checkpoint-N/` and
renames the finished folder to `checkpoint-N` once every process is done: a rename is atomic on one filesystem,
so `checkpoint-N` exists only when it is whole. (transformers 4.36 did the same and reverted it in 4.37 because
every process renamed; here only the process that saves does, after a barrier.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from ._schema import read_json


logger = logging.getLogger(__name__)

# Written by IA3Seq2SeqTrainer beside every adapter it saves: what training derived from the data (label set,
# generation bound) and how it encoded sources; IA3Predictor reads it.
INFERENCE_FILE = "inference.json"
STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N` matches neither Trainer's `^checkpoint-\d+$` nor its `checkpoint-*` glob
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` entries in `output_dir`, newest (highest N) first (a crash may leave one that is no
    folder, or not a whole one: `last_checkpoint` checks)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    steps = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _CHECKPOINT.match(path.name))]
    return [path for _, path in sorted(steps, reverse=True)]


def last_checkpoint(output_dir: str | Path, accelerator=None) -> str | None:
    """The newest whole `checkpoint-N` folder in `output_dir`, or None.

    A folder counts as whole when its `trainer_state.json` (the last file Trainer writes) reads as JSON. Every
    checkpoint this package writes is whole; the check skips folders that a crash left behind when they were
    written in place (older versions, a plain `Trainer`), with a warning naming them.

    With an `accelerator` of several processes (every process must call it then), each process looks in its own
    `output_dir` (machines need not share a disk) and all agree on the newest step whole for every one of them: a
    machine lost between its save and another's leaves them a step apart, and processes that resumed from different
    steps would train different models. When some processes have a checkpoint and others none (a machine that does
    not share the disk and saved none: `training.save_on_each_node` false), every process raises the same
    `RecipeError`.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return next((str(path) for path in _whole_checkpoints(output_dir)), None)
    from accelerate.utils import gather_object

    mine = {_step(path): path for path in _whole_checkpoints(output_dir)}
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
    from .recipe import RecipeError

    newest = {}  # newest step (None: no checkpoint) -> the processes that have it
    for rank, steps in enumerate(found):
        newest.setdefault(steps[0] if steps else None, []).append(rank)
    have = ", ".join(f"{_processes(ranks)}: " + ("none" if step is None else f"checkpoint-{step}")
                     for step, ranks in newest.items())
    raise RecipeError(
        f"training.output_dir: no checkpoint in {output_dir} that every process has, to resume from ({have}); "
        "each machine reads its own disk: set training.save_on_each_node to true when machines do not share one "
        "(or put training.output_dir on a shared filesystem), or train without --resume to start over"
    )


def _whole_checkpoints(output_dir: str | Path):
    for path in checkpoint_folders(output_dir):
        if path.is_dir() and _has_trainer_state(path):
            yield path
        else:
            logger.warning("Skipping %s: it has no readable trainer_state.json (a save that did not finish)", path)


def _step(path: Path) -> int:
    return int(_CHECKPOINT.match(path.name).group(1))


def _processes(ranks: list[int]) -> str:
    """`process 1`, `processes 8-15` (contiguous), `processes 1, 3`."""
    if len(ranks) == 1:
        return f"process {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"processes {ranks[0]}-{ranks[-1]}"
    return "processes " + ", ".join(map(str, ranks))


def save_checkpoint_atomically(trainer, trial, save) -> None:
    """Run `save()` (Trainer's `_save_checkpoint`) into a staging folder, then publish it as `checkpoint-N`.

    Every process writes its part (its RNG state, its shard under FSDP or DeepSpeed) into the staging folder;
    after a barrier each process that saves (one, or one per machine with `save_on_each_node`) renames it, and after
    the next one rotates old checkpoints as Trainer would have. A process that saves nothing removes what it staged
    if it is still there (its machine's own disk).
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
    trainer._checkpoint_staging_root = staging_root
    try:
        save()
    finally:
        trainer._checkpoint_staging_root = None
    trainer.accelerator.wait_for_everyone()
    # Trainer saw the staging folder as the run folder, so a best checkpoint saved just now has its staging path.
    moved_best = state.best_model_checkpoint == staged
    if moved_best:
        state.best_model_checkpoint = final
    if args.should_save:
        if moved_best:
            state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if os.path.isdir(final):  # resumed from an older checkpoint and reached this step again
            shutil.rmtree(final)
        os.replace(staged, final)
        os.rmdir(staging_root)
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        # Old checkpoints go only once every machine has published this one (training.save_on_each_node): a machine
        # lost before its rename leaves an older step that every machine still has, for `--resume` to agree on.
        rotate_checkpoints(
            output_dir=run_dir, save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint, use_mtime=True,
        )
    else:
        # Every process wrote its RNG state into the staging folder. On a shared disk the saving process has moved it
        # by now; on a machine with its own disk that saves nothing (training.save_on_each_node false) no process
        # would, and a tmp-checkpoint-N would be left there at each save.
        shutil.rmtree(staging_root, ignore_errors=True)


def _has_trainer_state(path: Path) -> bool:
    try:
        read_json(path / "trainer_state.json", allow_nan=True)
    except (OSError, ValueError):
        return False
    return True
