"""`run.json`, the record of which run an output folder holds: what its fields may be, reading it (a field of the
wrong kind left out), a new record, who holds a folder's lock, and the recipe an older run left beside its
checkpoints. `ia3_trainer.training.runs` applies the rules that read it."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from ia3_trainer.errors import redact_urls
from ia3_trainer.jsonfiles import read_json


RUN_FILE = "run.json"


# The fields of run.json that the rules read, each with whether a value of it is usable.
RECORD_FIELDS = {
    "recipe": lambda value: isinstance(value, dict),
    "precision": lambda value: value in ("bf16", "fp16", "fp32"),
    "resumed": lambda value: isinstance(value, list),
    "started": lambda value: isinstance(value, str),
    "data": lambda value: isinstance(value, dict),
}


def read_record(folder: Path) -> dict | None:
    """The folder's run.json, a field missing or of another kind (a file edited by hand or damaged) left out: every
    process must fail here with the same OSError or ValueError (`runs._agree`), never a KeyError or TypeError."""
    try:
        record = read_json(folder / RUN_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return {key: value for key, value in record.items() if key not in RECORD_FIELDS or RECORD_FIELDS[key](value)}


def new_record(recipe: dict | None, precision: str | None) -> dict:
    """The run.json of a run that starts now on this machine."""
    return {"run_id": uuid.uuid4().hex, "started": now(), "host": socket.gethostname(), "pid": os.getpid(),
            "resumed": [], "precision": precision, "recipe": recipe}


def now() -> str:
    """The local time as run.json and the lock file record it."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def lock_holder(lock_file: Path) -> str:
    """Who holds `lock_file`, as its holder wrote it."""
    try:
        holder = json.loads(lock_file.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"  # it holds the lock and has not written its name yet


def checkpoint_recipe(checkpoints: list[Path]) -> dict | None:
    """The recipe a run without `run.json` (an older version's) saved beside its newest checkpoint."""
    for checkpoint in checkpoints:
        try:
            recipe = read_json(checkpoint / "recipe.json")
        except (OSError, ValueError):
            continue
        return redact_urls(recipe) if isinstance(recipe, dict) else None  # compared with a redacted recipe
    return None
