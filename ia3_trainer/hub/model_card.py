"""The model card (`README.md`) of an adapter folder, from `templates/model_card.md`: the one card of this package.

peft's `save_pretrained` writes a generic `README.md` into every adapter folder; [`IA3Seq2SeqTrainer`] replaces it
with this card right after each save, and every push writes this card again, for the repo pushed to, into the copy
it uploads. Holds no training logic.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

from ia3_trainer.data.sources import is_hub_dataset
from ia3_trainer.errors import redact_urls
from ia3_trainer.jsonfiles import read_json, write_text
from ia3_trainer.layout import CARD_FILE, safetensors_header


TEMPLATE_PATH = Path(__file__).parents[1] / "templates" / "model_card.md"
TAGS = ["peft", "ia3", "ia3-trainer"]  # every card has these; a trainer's `_tag_names` adds its own

_TASKS = {"SEQ_2_SEQ_LM": "text2text-generation", "CAUSAL_LM": "text-generation"}
_EXAMPLE = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007."
# Logged numbers that describe the optimizer or the speed, not the model: metrics.json keeps them, the card not.
_BOOKKEEPING = {"step", "learning_rate", "grad_norm", "total_flos"}


def write_model_card(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    trainable_parameters: int | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write `README.md` in an adapter folder, whole or not at all: Hub metadata, training settings, final metrics
    and a usage snippet.

    The base model and the IA3 settings are read from the folder's `adapter_config.json`, and the recipe from its
    `recipe.json` unless `recipe` is given. The card holds only what is passed here and what those files say, so no
    token can end up in it.

    Args:
        folder (`str` or `Path`):
            Folder written by [`~peft.PeftModel.save_pretrained`]; it must hold `adapter_config.json`.
        repo_id (`str`, *optional*):
            Hub repo the card is for (`user/name`); the title and the usage snippet name it. Defaults to the
            recipe's `hub.repo_id`; without one the card names the run's `training.output_dir`.
        metrics (`dict[str, Any]`, *optional*):
            Final metrics; numeric values are listed in a table, others are left out (see [`card_metrics`]).
        recipe (`dict[str, Any]`, *optional*):
            The resolved recipe (what `recipe.json` holds). Its `data` section names the dataset and its
            `description` is quoted.
        trainable_parameters (`int`, *optional*):
            Number of trainable (IA3) parameters; defaults to the number of values in `adapter_model.safetensors`.
        tags (`list[str]`, *optional*):
            Hub tags besides `TAGS` and the task (a trainer's `_tag_names`).

    Returns:
        `Path`: the path of the written `README.md`.

    Example:

    >>> write_model_card("outputs/phrasebank", repo_id="alice/flan-t5-small-ia3", metrics={"eval_loss": 0.4})
    PosixPath('outputs/phrasebank/README.md')
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = read_json(folder / "adapter_config.json")
    if recipe is None and (folder / "recipe.json").is_file():
        recipe = read_json(folder / "recipe.json")
    recipe = redact_urls(recipe or {})  # a data URL's password or token never reaches a card
    data = recipe.get("data") or {}
    repo_id = repo_id or (recipe.get("hub") or {}).get("repo_id")
    base_model = config.get("base_model_name_or_path") or "unknown"
    task = _TASKS.get(config.get("task_type"), "text2text-generation")
    dataset_id = _hub_id(data.get("path")) if is_hub_dataset(data.get("path")) else None  # not a builder of files

    # The Hub only accepts repo ids in `base_model` and `datasets`: a local base model or data files stay in the
    # card's text, not in its metadata.
    card_data = ModelCardData(
        library_name="peft",
        base_model=_hub_id(base_model),
        datasets=[dataset_id] if dataset_id else None,
        tags=list(dict.fromkeys([*TAGS, *(tags or []), task])),
    )
    output_dir = (recipe.get("training") or {}).get("output_dir")
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=repo_id or recipe.get("name") or folder.resolve().name,
        load_from=repo_id or output_dir or "path/to/this/folder",
        base_model=base_model,
        description=recipe.get("description"),
        dataset=_describe_dataset(data, dataset_id),
        target_modules=_describe_modules(config.get("target_modules")),
        feedforward_modules=_describe_modules(config.get("feedforward_modules")),
        trainable_parameters=trainable_parameters if trainable_parameters is not None else _count_parameters(folder),
        metrics=_format_metrics(metrics or {}),
        example=json.dumps((data.get("source_prefix") or "") + _EXAMPLE),
    )
    return write_text(folder / CARD_FILE, str(card))


def latest_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest value of each number logged in `log_history` (a `TrainerState.log_history`)."""
    latest: dict[str, Any] = {}
    for entry in log_history:
        latest.update(entry)
    return latest


def card_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """[`latest_metrics`] without optimizer and speed bookkeeping: what a card lists."""
    return {
        name: value
        for name, value in latest_metrics(log_history).items()
        if name not in _BOOKKEEPING and not name.endswith(("_runtime", "_per_second"))
    }


def card_tags(folder: str | Path) -> list[str] | None:
    """The tags of the card in `folder` when it is one of ours (it carries the `ia3-trainer` tag), else None: a push
    writes the card again and keeps the tags the trainer gave it."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        tags = ModelCard.load(path).data.tags
    except Exception:  # peft's card or a hand-written one: its metadata is not ours to keep
        return None
    return list(tags) if isinstance(tags, list) and "ia3-trainer" in tags else None


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


def _count_parameters(folder: Path) -> int | None:
    """The number of values in the folder's `adapter_model.safetensors` (from its header), or None when there is no
    such whole file."""
    tensors = safetensors_header(folder / "adapter_model.safetensors")
    return None if tensors is None else sum(math.prod(entry["shape"]) for entry in tensors.values())


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
