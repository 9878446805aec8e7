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
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ProcessesDisagreeError, RunFolderError, first_line
from .jsonfiles import read_json


logger = logging.getLogger(__name__)

# Written by IA3Seq2SeqTrainer beside every adapter it saves: what training derived from the data (label set,
# generation bound) and how it encoded sources; IA3Predictor reads it.
INFERENCE_FILE = "inference.json"
CARD_FILE = "README.md"  # the model card (`ia3_trainer.model_card` writes it)
# Files that describe the adapter beside them: published after it, in this order (the card, which a Hub push reads,
# last), so that they never describe what is not there.
METADATA_FILES = ("recipe.json", INFERENCE_FILE, CARD_FILE)
STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N` matches neither Trainer's `^checkpoint-\d+$` nor its `checkpoint-*` glob
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TORCH_WRITER = ("inline_container", "PytorchStreamWriter")  # what torch.save's write failures name


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


def checkpoint_damage(path: str | Path) -> str | None:
    """Why `path` is no checkpoint to resume from, or None when it is whole.

    Whole means: a folder whose `trainer_state.json` (the last file Trainer writes) reads as a Trainer state (JSON,
    each field of its type), and whose weights and states read too: every `.safetensors` file is as long as its header
    says, and every `.pt`, `.pth` and `.bin` file (`torch.save`'s zip format) is a zip file whose every record matches
    its checksum. A file that a disk cut, lost or damaged after the save would otherwise pass, and resuming would fail
    inside torch or safetensors with a message that names no file.
    """
    path = Path(path)
    if not path.is_dir():
        return "it is not a folder"
    try:
        state = read_json(path / "trainer_state.json", allow_nan=True)
    except (OSError, ValueError):
        return "it has no readable trainer_state.json (a save that did not finish)"
    problem = _state_problem(state)
    if problem is not None:
        return f"its trainer_state.json {problem}"
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        if file.suffix == ".safetensors" and safetensors_header(file) is None:
            return f"its {file.name} is truncated or unreadable"
        if file.suffix in (".pt", ".pth", ".bin"):
            problem = _zip_problem(file)
            if problem is not None:
                return f"its {file.name} {problem}"
    return None


# The fields of a Trainer state that resuming reads, and the JSON types each may hold (transformers' `TrainerState`).
_NUMBER = (int, float)
_STATE_TYPES = {
    "epoch": _NUMBER, "global_step": int, "max_steps": int, "logging_steps": _NUMBER, "eval_steps": _NUMBER,
    "save_steps": _NUMBER, "train_batch_size": (int, type(None)), "num_train_epochs": _NUMBER,
    "num_input_tokens_seen": int, "total_flos": _NUMBER, "log_history": list, "best_metric": (*_NUMBER, type(None)),
    "best_global_step": (int, type(None)), "best_model_checkpoint": (str, type(None)),
    "trial_params": (dict, type(None)), "stateful_callbacks": (dict, list, type(None)),
}


def _state_problem(state) -> str | None:
    """What makes `state` (a parsed `trainer_state.json`) no Trainer state, or None."""
    if not isinstance(state, dict):
        return f"holds a JSON {type(state).__name__}, not an object"
    for key, types in _STATE_TYPES.items():  # a missing field takes TrainerState's default
        value = state.get(key)
        if key in state and (not isinstance(value, types) or isinstance(value, bool)):
            return f"has {key} {json.dumps(value)[:40]} (of the wrong type)"
    if state.get("global_step", 0) < 0:
        return f"has global_step {state['global_step']} (not a step count)"
    if not all(isinstance(entry, dict) for entry in state.get("log_history") or []):
        return "has a log_history entry that is not an object"
    return None


def _zip_problem(file: Path) -> str | None:
    """Why the `torch.save` file `file` does not read back, or None: a cut file has no zip directory, and a damaged
    record fails its CRC-32 (read in full: the states of an IA3 checkpoint are small)."""
    if not zipfile.is_zipfile(file):
        return "is truncated or unreadable"
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except Exception as error:  # zipfile raises BadZipFile, OSError, zlib.error, EOFError, ValueError, ...
        return f"is damaged ({first_line(error)})"
    return None if bad is None else f"is damaged (its record {bad} fails its checksum)"


def safetensors_header(path: str | Path) -> dict | None:
    """The tensors of a `.safetensors` file, `{name: {"dtype", "shape", "data_offsets"}}`, read from its header (8
    bytes giving the header's length, then JSON) when the file holds exactly the bytes the header covers; None for a
    missing, truncated or damaged file."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 2 <= size <= 100_000_000:  # safetensors refuses headers over 100 MB
                return None
            header = json.loads(file.read(size))
        tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
        end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
        if not all(isinstance(entry["shape"], list) and all(type(n) is int and n >= 0 for n in entry["shape"])
                   for entry in tensors.values()):
            return None
        return tensors if path.stat().st_size == 8 + size + end else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _whole_checkpoints(output_dir: str | Path):
    for path in checkpoint_folders(output_dir):
        problem = checkpoint_damage(path)
        if problem is None:
            yield path
        else:
            logger.warning("Skipping %s: %s; it cannot be resumed from", path, problem)


def _step(path: Path) -> int:
    return int(_CHECKPOINT.match(path.name).group(1))


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
                best_model_checkpoint=state.best_model_checkpoint, use_mtime=True,
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


def publish(staged: str | Path, final: str | Path) -> None:
    """Move the file or folder `staged` to `final` on the same filesystem, replacing what is there.

    A file replaces the old one atomically (`os.replace`). A folder cannot replace a non-empty one in one rename: the
    old one is renamed aside first (and back when the second rename fails) and removed after, so `final` is the old
    folder or the new one, never a mix, and never gone for longer than between two renames.
    """
    staged, final = Path(staged), Path(final)
    if not (staged.is_dir() and final.is_dir()):
        os.replace(staged, final)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, aside / final.name)
    try:
        os.replace(staged, final)
    except BaseException:
        os.replace(aside / final.name, final)  # the old one back
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
