"""`merge_adapter`: fold an adapter's IA3 vectors into its base model's weights and save a plain transformers model
(`ia3-trainer merge`), into a folder that holds neither the adapter nor the base model it reads."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from ia3_trainer.errors import PathError
from ia3_trainer.inference.adapters import read_adapter
from ia3_trainer.inference.predictor import load_adapter_model
from ia3_trainer.layout import publish
from ia3_trainer.modeling import loading as modeling
from ia3_trainer.recipe.output_dir import resolved


def merge_adapter(dir_or_repo: str | Path, merged_dir: str | Path, *, revision: str | None = None,
                  overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Fold the adapter's IA3 vectors into the base weights and save a plain transformers model plus tokenizer.

    The merged model loads with `AutoModelForSeq2SeqLM.from_pretrained(merged_dir)` and has exactly the base
    model's parameters. A separate output head (mt0, mT5, flan-t5) is saved with `tie_word_embeddings: false`.
    `merged_dir` must be new or empty; `overwrite=True` replaces a folder that holds a saved model (an earlier merge).
    It is never the adapter's folder or its base model's, nor a folder that holds either. The model is written to a
    temporary folder beside `merged_dir` and renamed into place once complete: a failure leaves `merged_dir` as it was.
    Code shipped with the base model or tokenizer runs only with `trust_remote_code=True`, never because the
    adapter's own `recipe.json` asks for it.
    """
    merged_dir = Path(merged_dir).expanduser()
    target = resolved(merged_dir, "merged_dir")
    adapter = read_adapter(dir_or_repo, revision)
    folder, base = adapter.folder, adapter.base_model
    # (folder, what merged_dir is when it is that folder, when it holds it, when it is inside it; None: allowed)
    protected = [(folder.resolve(), "is the adapter folder itself", "holds the adapter folder", None)]
    if Path(base).expanduser().is_dir():  # inside the base model's folder, the merge would change what it loads
        described = f"the adapter's base model {base}"
        protected.append((Path(base).expanduser().resolve(), f"is {described}", f"holds {described}",
                          f"is inside {described}"))
    for path, equal, holds, inside in protected:
        problem = equal if target == path else holds if target in path.parents else (
            inside if path in target.parents else None)
        if problem:
            raise PathError(key="merged_dir", problem=f"{merged_dir} {problem}",
                            fix="give a new folder for the merged model")
    if target.exists() and not target.is_dir():
        raise PathError(key="merged_dir", problem=f"{merged_dir} is a file",
                        fix="give a new folder for the merged model")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise PathError(key="merged_dir", problem=f"{merged_dir} is not empty",
                            fix="give a new folder, or pass overwrite=True to replace the model in it")
        if not (target / "config.json").is_file():
            raise PathError(key="merged_dir",
                            problem=f"{merged_dir} holds files that are not a saved model (no config.json)",
                            fix="overwrite=True replaces only an earlier merge: give a new folder")
    # Merging encodes no text: an adapter trained with a custom preprocess merges like any other.
    try:  # before the model loads: a parent that cannot hold the merged model fails at once
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PathError(key="merged_dir", problem=f"cannot make {target.parent}: {error.strerror or error}",
                        fix="give a folder whose parent can be written") from None
    model, tokenizer = load_adapter_model(adapter, dir_or_repo, trust_remote_code=trust_remote_code)
    merged = model.merge_and_unload(safe_merge=True)
    modeling.untie_separate_lm_head(merged)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return merged_dir
