"""The package's JSON and metadata files: one reader (`read_json`: one-line errors naming the file, no `NaN` unless
asked for) and writes that leave the whole file or the previous one, never a truncated one (`write_json`,
`write_text`, `write_bytes`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ia3_trainer.errors import InputError, PathError, first_line


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as inf
        raise _NotFinite(text)
    return value


def _loads(text: str, allow_nan: bool = False) -> Any:
    # Python's json reads NaN and Infinity (not JSON) and turns 1e400 into inf; a recipe holds neither.
    if allow_nan:
        return json.loads(text)
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def read_json(path: str | Path, allow_nan: bool = False) -> Any:
    """Read the JSON file `path`. Every problem is one line that starts with the path.

    `allow_nan=True` reads `NaN` and `Infinity` as Python writes them (`json.dumps` does in the metrics and
    `trainer_state.json` files that training writes: a perplexity can overflow to inf).

    Raises:
        `PathError` (an `OSError`): the file cannot be read.
        `InputError` (a `ValueError`): it is not UTF-8 text, not JSON (with line and column), nested too deeply
            to read, or it holds a number that is not finite (`NaN`, `Infinity`, `1e400`), which Python reads but
            JSON does not have.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from error
    except OSError as error:
        raise PathError(f"{path}: cannot read it: {error.strerror or first_line(error)}") from error
    try:
        return _loads(text, allow_nan)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    except _NotFinite as error:
        raise InputError(f"{path}: non-finite number {error}; JSON has none: write a number or null") from error
    except RecursionError as error:  # json.loads recurses once per level; a hostile file can nest 100,000 deep
        raise InputError(f"{path}: nested too deeply to read; recipes nest lists and objects a few levels") from error
    except ValueError as error:  # an integer of over 4300 digits
        raise InputError(f"{path}: cannot read it: {first_line(error)}") from error


def finite(value: Any) -> Any:
    """`value` with every NaN and infinity in it (in nested dicts, lists and tuples) replaced by None: JSON has
    neither, and a file written from it then reads with `read_json`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def write_json(path: str | Path, data) -> Path:
    """Write `data` as JSON to `path` whole or not at all (see [`write_text`]), creating its folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PathError(f"{path}: cannot create its folder: {error.strerror or first_line(error)}") from error
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` whole or not at all: a temporary file beside it, flushed to disk, then renamed
    over it (a full disk or a crash leaves the previous file, never a truncated one). The folder must exist; a write
    that fails is a [`PathError`] naming the file."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all, as [`write_text`] does."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise PathError(f"{path}: cannot write it: {error.strerror or first_line(error)}; what was there before is "
                        "unchanged") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def parse_value(text: str) -> Any:
    """An override's value: JSON when it parses (finite numbers only), else the text itself."""
    try:
        return _loads(text)
    except (ValueError, RecursionError):
        return text
