"""Where a recipe's data comes from, read with `datasets.load_dataset`: local files (a folder is refused in words),
archives read through chained URLs (`zip://inner.txt::/path/file.zip`), and the Hub (`hf://` files, dataset ids),
which is asked once whether it can be reached before anything is downloaded (`ia3_trainer.network`).
[`ia3_trainer.data`] checks the columns and labels of what this returns.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ia3_trainer import network
from ia3_trainer.errors import DataError, first_line
from ia3_trainer.recipe.loading import DataSection


FILE_BUILDERS = ("csv", "json", "parquet", "text", "arrow", "pandas")  # datasets' own builders of local files


def read_dataset(data: DataSection):
    """`datasets.load_dataset` of the `data` section (a `DatasetDict`, or a `Dataset`), every problem one
    [`DataError`] (a `RecipeError`) naming the key: a folder given as a data file, data on the Hub while the Hub
    cannot be reached (at once, not after minutes of retries), an empty or non-UTF-8 file, a dataset that needs a
    loading script."""
    import datasets

    _check_data_files(data)
    key, hub = _hub_source(data)
    unreachable = network.hub_unreachable() if hub else None
    if unreachable is not None:  # else minutes of retries per file before the same failure
        raise DataError(
            f"{key}: {hub!r} is on the Hugging Face Hub: {unreachable}; connect to the network, download it and "
            f"point {key} at the local copy, or {network.OFFLINE_HINT}"
        )
    try:
        with _local_archives_readable_offline(data), builder_errors_unlogged():
            loaded = datasets.load_dataset(data.path, data.name, data_files=data.data_files, **data.load_kwargs)
    except (StopIteration, datasets.exceptions.DatasetGenerationError) as error:
        # datasets 5 on an empty file: the json builder raises StopIteration, csv and text a generation error.
        if isinstance(error.__cause__, UnicodeDecodeError):
            raise DataError(not_utf8(data, error.__cause__)) from error
        reason = first_line(error.__cause__) if error.__cause__ is not None else "a file has no examples"
        raise DataError(
            f"data.data_files: cannot read examples from {data.data_files!r} with {data.path!r}: {reason}; check "
            "that no file is empty and that data.path matches the file format"
        ) from error
    except Exception as error:
        # RuntimeError: datasets >= 4 refuses datasets that still need a loading script. The HTTP client's own
        # errors (no network) are no OSError.
        if not isinstance(error, (ValueError, OSError, RuntimeError)) and not network.is_network_error(error):
            raise
        where = f"{key}: cannot load {hub!r}" if hub else (
            f"data.path: cannot load {data.path!r} (data_files={data.data_files!r})")
        if network.is_network_error(error):
            raise DataError(
                f"{where}{network.offline_note()}: {first_line(error)}; connect to the network, or download it and "
                f"point {key} at the local copy"
            ) from None  # the cause is in the message; its chain is pages of retries
        raise DataError(
            f"{where}: {first_line(error)}; check data.path / data.data_files, the network, or use local files"
        ) from error
    return loaded


def _data_file_paths(data: DataSection) -> list[str]:
    files = data.data_files
    if files is None:
        return []
    values = files.values() if isinstance(files, dict) else [files]
    return [str(item) for value in values for item in (value if isinstance(value, (list, tuple)) else [value])]


def _check_data_files(data: DataSection) -> None:
    """A local folder named as a data file is refused in words (datasets says "Unable to find" it)."""
    for path in _data_file_paths(data):
        if "://" not in path and Path(path).expanduser().is_dir():
            raise DataError(
                f"data.data_files: {path} is a folder; name the files in it, e.g. {path.rstrip('/')}/*.csv"
            )


def _hub_source(data: DataSection) -> tuple[str, str | None]:
    """`(key, what)`: the `data.data_files` entry (`hf://...`) or the `data.path` (a Hub dataset id) that loading
    downloads from the Hub; `what` is None when everything is local (or read from another server)."""
    hub_files = [path for path in _data_file_paths(data) if "hf://" in path]
    if hub_files:
        return "data.data_files", hub_files[0]
    if is_hub_dataset(data.path):
        return "data.path", data.path
    return "data.data_files", None


def is_hub_dataset(path: object) -> bool:
    """Whether a recipe's `data.path` names a dataset repo on the Hub: not one of datasets' builders of files
    (`csv`, `json`, `text`, ...) and not a local path."""
    import datasets

    if not isinstance(path, str) or not path:
        return False
    builders = getattr(datasets.packaged_modules, "_PACKAGED_DATASETS_MODULES", FILE_BUILDERS)
    return path not in builders and not Path(path).expanduser().exists()


@contextlib.contextmanager
def _local_archives_readable_offline(data: DataSection):
    """datasets 5.2 refuses a local archive read through a chained URL (`zip://inner.txt::/path/file.zip`, how the
    phrasebank recipe reads a downloaded zip) when HF_HUB_OFFLINE is set: it asks for the file's details as if it
    were remote. Nothing is downloaded when every data file is local, so offline mode is lifted for datasets
    during that one call."""
    import datasets

    paths = _data_file_paths(data)
    chained = [path.rsplit("::", 1)[-1].removeprefix("file://") for path in paths if "::" in path]
    local = chained and all("://" not in path and Path(path).exists() for path in chained) and all(
        "://" not in path or "::" in path for path in paths) and _hub_source(data)[1] is None
    if not local or not datasets.config.HF_HUB_OFFLINE:
        yield
        return
    datasets.config.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def builder_errors_unlogged():
    """datasets' file builders log "Failed to read file ..." before raising the error: the error, reported as one
    line naming the key or the option, says it all."""
    import logging

    builders = logging.getLogger("datasets.packaged_modules")
    level = builders.level
    builders.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        builders.setLevel(level)


def not_utf8(data: DataSection, error: UnicodeDecodeError) -> str:
    """The message for a data file that is not UTF-8 text."""
    return (
        f"data.data_files: {data.data_files!r} is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
        "UTF-8, or name its encoding for csv and text files in data.load_kwargs, e.g. {\"encoding\": \"latin-1\"}"
    )
