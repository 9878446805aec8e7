"""Write the model card (`README.md`) of an adapter folder from `templates/model_card.md`. Holds no training logic."""

import json
import os
from pathlib import Path
from typing import Any

from ._schema import read_json


TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

# `datasets.load_dataset` builder names: such a recipe read local or remote files, not a Hub dataset repo.
_BUILDERS = {"arrow", "csv", "json", "pandas", "parquet", "sql", "text", "webdataset", "xml"}
_TASKS = {"SEQ_2_SEQ_LM": "text2text-generation", "CAUSAL_LM": "text-generation"}
_EXAMPLE = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007."


def write_model_card(
    folder: str | Path,
    *,
    repo_id: str,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    trainable_parameters: int | None = None,
) -> Path:
    """Write `README.md` in an adapter folder: Hub metadata, training settings, final metrics and a usage snippet.

    The base model and the IA3 settings are read from the folder's `adapter_config.json`. The card holds only what
    is passed here and what that file says, so no token can end up in it.

    Args:
        folder (`str` or `Path`):
            Folder written by [`~peft.PeftModel.save_pretrained`]; it must hold `adapter_config.json`.
        repo_id (`str`):
            Hub repo the card is for (`user/name`); the usage snippet loads the adapter from it.
        metrics (`dict[str, Any]`, *optional*):
            Final metrics; numeric values are listed in a table, others are left out.
        recipe (`dict[str, Any]`, *optional*):
            The resolved recipe (what `recipe.json` holds). Its `data` section names the dataset and its
            `description` is quoted.
        trainable_parameters (`int`, *optional*):
            Number of trainable (IA3) parameters.

    Returns:
        `Path`: the path of the written `README.md`.

    Example:

    >>> write_model_card("outputs/phrasebank", repo_id="alice/flan-t5-small-ia3", metrics={"eval_loss": 0.4})
    PosixPath('outputs/phrasebank/README.md')
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = read_json(folder / "adapter_config.json")
    recipe = recipe or {}
    data = recipe.get("data") or {}
    base_model = config.get("base_model_name_or_path") or "unknown"
    task = _TASKS.get(config.get("task_type"), "text2text-generation")
    dataset_id = None if data.get("path") in _BUILDERS else _hub_id(data.get("path"))

    # The Hub only accepts repo ids in `base_model` and `datasets`: a local base model or data files stay in the
    # card's text, not in its metadata.
    card_data = ModelCardData(
        library_name="peft",
        base_model=_hub_id(base_model),
        datasets=[dataset_id] if dataset_id else None,
        tags=["peft", "ia3", "ia3-trainer", task],
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        repo_id=repo_id,
        base_model=base_model,
        description=recipe.get("description"),
        dataset=_describe_dataset(data, dataset_id),
        target_modules=_describe_modules(config.get("target_modules")),
        feedforward_modules=_describe_modules(config.get("feedforward_modules")),
        trainable_parameters=trainable_parameters,
        metrics=_format_metrics(metrics or {}),
        example=json.dumps((data.get("source_prefix") or "") + _EXAMPLE),
    )
    path = folder / "README.md"
    card.save(path)
    return path


def _hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id rather than a local path or a URL, else `None`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _describe_dataset(data: dict[str, Any], dataset_id: str | None) -> str:
    if dataset_id:
        config = f" (`{data['name']}`)" if data.get("name") else ""
        return f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id}){config}"
    if data.get("path"):
        files = data.get("data_files")
        return f"`{data['path']}` files: `{files}`" if files else f"`{data['path']}`"
    return "not recorded"


def _describe_modules(modules: str | list[str] | None) -> str:
    if modules is None:
        return "none"
    if isinstance(modules, str):  # peft also takes a regular expression
        return f"`{modules}` (regular expression)"
    return ", ".join(f"`{name}`" for name in sorted(modules))


def _format_metrics(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, value in sorted(metrics.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append((name, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows
