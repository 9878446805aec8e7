"""What a run trained on, as a fingerprint kept in its `run.json`: a hash of each prepared split and the label set.

Resuming continues a run only on the data it trained on so far: a data file edited between a run and its `--resume`
(labels renamed, rows added) would train the first steps on the old data and the rest on the new, and the checkpoint
and the final `inference.json` would disagree. The hash is of the prepared (tokenized) examples, so it covers local
files, Hub datasets and a custom `preprocess` alike, whatever the files are called.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ia3_trainer.errors import RecipeError, shorten


_BATCH = 16384  # rows hashed at a time
# How the splits are hashed: hashes made another way (by another version) are not compared, only the label sets.
METHOD = "sha256-arrow-1"


def data_fingerprint(train_dataset, eval_dataset, label_names: list[str] | None, recipe: dict | None) -> dict:
    """`{"method", "train": hash, "validation": hash or None, "labels": label set or None, "max_eval_samples"}` of the
    datasets a trainer holds; a split that is no `datasets.Dataset` (a torch dataset, a stream) hashes to None."""
    data = (recipe or {}).get("data") or {}
    return {"method": METHOD, "train": dataset_hash(train_dataset), "validation": dataset_hash(eval_dataset),
            "labels": list(label_names) if label_names else None, "max_eval_samples": data.get("max_eval_samples")}


def dataset_hash(dataset) -> str | None:
    """SHA-256 of every column of `dataset`, row by row in order (None for anything but a `datasets.Dataset`)."""
    try:
        import datasets
    except ImportError:
        return None
    if not isinstance(dataset, datasets.Dataset):
        return None
    digest = hashlib.sha256()
    columns = sorted(dataset.column_names)
    digest.update(json.dumps(columns).encode())
    for table in dataset.with_format("arrow").iter(batch_size=_BATCH):
        for column in columns:
            _update(digest, table.column(column).combine_chunks())
    return digest.hexdigest()


def _update(digest, array) -> None:
    """Add an Arrow array to `digest`: numbers as their bytes, lists as their lengths and then their values (token
    ids hash at memory speed), anything else as JSON."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digest.update(str(array.type).encode())
    if array.null_count:
        digest.update(array.is_null().to_numpy(zero_copy_only=False).tobytes())
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        digest.update(pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).tobytes())
        _update(digest, array.flatten())
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        digest.update(array.fill_null(False if pa.types.is_boolean(kind) else 0)
                      .to_numpy(zero_copy_only=False).tobytes())
    else:
        digest.update(json.dumps(array.to_pylist(), default=str, ensure_ascii=False).encode())


def check_same_data(saved: dict | None, new: dict | None, recipe: dict | None, where: Path) -> None:
    """Refuse resuming the run of `where`, whose data fingerprint is `saved`, on data whose fingerprint is `new`: the
    label set and the training split must be the same, and so must the validation split unless
    `data.max_eval_samples` changed (a resumable key that cuts it). Nothing to compare when either is unknown."""
    if not isinstance(saved, dict) or not isinstance(new, dict):
        return
    data = (recipe or {}).get("data") or {}
    fix = (f"resuming would train on other data than the steps before it: restore the data the run of {where} "
           "trained on, or set training.overwrite_output_dir to start over (train into a new training.output_dir to "
           "keep that run)")
    if saved.get("labels") != new.get("labels"):
        raise RecipeError(
            key=_source(data, "train"), fix=fix, problem=f"the label set changed since the checkpoint in {where} "
            f"({_labels(saved.get('labels'))} -> {_labels(new.get('labels'))})")
    if saved.get("method") != new.get("method"):
        return
    if _differ(saved.get("train"), new.get("train")):
        raise RecipeError(key=_source(data, "train"), fix=fix,
                          problem=f"the training data changed since the checkpoint in {where}")
    if _differ(saved.get("validation"), new.get("validation")) \
            and saved.get("max_eval_samples") == new.get("max_eval_samples"):
        raise RecipeError(key=_source(data, "validation"), fix=fix,
                          problem=f"the validation data changed since the checkpoint in {where}")


def _differ(old: str | None, new: str | None) -> bool:
    return old is not None and new is not None and old != new


def _source(data: dict, split: str) -> str:
    """Where the recipe reads `split` ("train" or "validation") from, as the key to look at: `data.data_files train
    (path)`, `data.data_files (path)` or `data.path 'id' split 'name'`."""
    files = data.get("data_files")
    name = data.get(f"{split}_split") or (data.get("train_split") or "train")
    if isinstance(files, dict):
        key = name if name in files else next(iter(files), None)
        if key is not None:
            return f"data.data_files {key} ({_shown(files[key])})"
    if files:
        return f"data.data_files ({_shown(files)})"
    return f"data.path {data.get('path')!r} split {name!r}"


def _shown(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return shorten(value if isinstance(value, str) else json.dumps(value), 120)


def _labels(labels: list[str] | None) -> str:
    return "no label set" if not labels else shorten(json.dumps(labels, ensure_ascii=False), 100)
