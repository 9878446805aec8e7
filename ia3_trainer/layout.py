"""The run folder's layout: the names of the files a run writes, finding its `checkpoint-N` folders and telling a
whole one from a damaged one, reading a `.safetensors` header, and publishing a staged file or folder atomically.

Every layer that reads or writes a run folder (training, the Hub push, inference, the report) uses these, so this
module sits at the bottom beside `errors` and `jsonfiles` and imports nothing else of the package's; the act of
checkpointing (staging, barriers, rotation) is `ia3_trainer.training.checkpoints`'s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from ia3_trainer.errors import first_line
from ia3_trainer.jsonfiles import read_json


# Written by IA3Seq2SeqTrainer beside every adapter it saves: what training derived from the data (label set,
# generation bound) and how it encoded sources; IA3Predictor reads it.
INFERENCE_FILE = "inference.json"
CARD_FILE = "README.md"  # the model card (`ia3_trainer.hub.model_card` writes it)
# Files that describe the adapter beside them: published after it, in this order (the card, which a Hub push reads,
# last), so that they never describe what is not there.
METADATA_FILES = ("recipe.json", INFERENCE_FILE, CARD_FILE)
STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N` matches neither Trainer's `^checkpoint-\d+$` nor its `checkpoint-*` glob
# The evaluation report (`ia3_trainer.evaluation.report` writes them).
REPORT_FILE = "eval_report.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
REPORT_FILES = (REPORT_FILE, CONFUSION_PNG, CURVES_PNG)  # what `write_report` may write
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` entries in `output_dir`, newest (highest N) first (a crash may leave one that is no
    folder, or not a whole one: `checkpoint_damage` checks)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    steps = [(checkpoint_step(path), path) for path in folder.iterdir() if CHECKPOINT_NAME.match(path.name)]
    return [path for _, path in sorted(steps, reverse=True)]


def checkpoint_step(path: str | Path) -> int:
    """N of a `checkpoint-N` folder."""
    return int(CHECKPOINT_NAME.match(Path(path).name).group(1))


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
