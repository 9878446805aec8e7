"""Find and read an adapter folder: a training `output_dir`, one of its `checkpoint-N` folders, or a Hub repo's
download; what it holds (`adapter_config.json`, the weights, `recipe.json`, `inference.json`), checked before any
model loads; and the base model it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ia3_trainer import network
from ia3_trainer.errors import HubError, InputError, RecipeError, first_line
from ia3_trainer.jsonfiles import read_json
from ia3_trainer.layout import INFERENCE_FILE, checkpoint_folders, safetensors_header
from ia3_trainer.recipe.loading import Recipe, load_saved_recipe


# Files of a Hub adapter repo that loading never needs: intermediate checkpoints and TensorBoard logs.
HUB_IGNORE = ["checkpoint-*", "runs/*", "*.pt", "*.pth", "*.bin.index.json"]
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves, safetensors by default


@dataclass
class AdapterFolder:
    """An adapter folder on this machine and what it says.

    folder (`Path`): the local folder (a Hub repo's download). config (`dict`): its `adapter_config.json`.
    recipe ([`Recipe`], *optional*): its validated `recipe.json`. inference (`dict`, *optional*): its
    `inference.json`. base_model (`str`): the base model to load it onto (see [`base_model_path`]).
    """

    folder: Path
    config: dict
    recipe: Recipe | None
    inference: dict | None
    base_model: str


def read_adapter(dir_or_repo: str | Path, revision: str | None = None) -> AdapterFolder:
    """Find the adapter folder (downloading a Hub repo) and read it; every problem is one [`InputError`] (a
    [`RecipeError`] for its `recipe.json`, a [`HubError`] for a Hub repo that cannot be loaded) that names the file,
    raised before any model loads."""
    folder = resolve_adapter(dir_or_repo, revision)
    recipe = load_saved_recipe(folder)  # first, as push does: a bad recipe.json is the one line whatever else is bad
    config = read_adapter_config(folder)
    check_weights(folder)
    inference = read_inference(folder / INFERENCE_FILE)
    return AdapterFolder(folder, config, recipe, inference, base_model_path(config, folder, recipe))


def resolve_adapter(dir_or_repo: str | Path, revision: str | None = None) -> Path:
    """The local folder holding the adapter: `dir_or_repo` itself, or a download of the Hub repo of that id (from
    the local cache when the Hub cannot be reached)."""
    path = Path(dir_or_repo).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            checkpoints = [c for c in checkpoint_folders(path) if (c / "adapter_config.json").is_file()]
            hint = (f"its latest checkpoint {checkpoints[0]} has one" if checkpoints
                    else "pass the training.output_dir of a finished run")
            raise InputError(f"{dir_or_repo}: holds no adapter (no adapter_config.json); {hint}")
        return path
    if path.exists():
        raise InputError(f"{dir_or_repo}: is a file; pass the folder that holds adapter_config.json")
    text = str(dir_or_repo)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise InputError(f"{dir_or_repo}: no such folder; pass a training output_dir, or a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(network.load_or_cached(
            lambda **cache: snapshot_download(text, revision=revision, ignore_patterns=HUB_IGNORE, **cache), text
        ))
    except network.NotCached as error:
        raise HubError(
            f"{dir_or_repo}: no such local folder, and no Hub repo of that id could be loaded: {error}, and it is not "
            f"in the local cache; check the path, or connect to the network ({network.OFFLINE_HINT})"
        ) from None
    except (OSError, ValueError) as error:
        offline = network.offline_note()
        raise HubError(
            f"{dir_or_repo}: no such local folder, and no Hub repo of that id could be loaded{offline}: "
            f"{first_line(error)}; check the path, or the repo id, the network and HF_TOKEN for a private repo"
        ) from error
    if not (folder / "adapter_config.json").is_file():
        raise HubError(f"{dir_or_repo}: the Hub repo holds no adapter_config.json; is it an adapter repo?")
    return folder


def read_adapter_config(folder: Path) -> dict:
    """`adapter_config.json` of `folder`: a JSON object of an IA3 adapter, or an [`InputError`] saying what it is."""
    path = folder / "adapter_config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise InputError(f"{path}: must be a JSON object (peft's adapter config), got a {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "IA3":
        what = f"a {peft_type} adapter" if peft_type else "no peft_type: not a peft adapter config"
        raise InputError(f"{path}: peft_type: {what}; ia3-trainer loads IA3 adapters (peft_type \"IA3\")")
    for key in ("target_modules", "feedforward_modules"):
        value = config.get(key)
        if value is not None and not _module_names(value):
            raise RecipeError(f"{path}: {key}: must be a module name or a list of module names, got "
                              f"{_shown(value)}; the file is damaged or was edited: "
                              "restore it from the run that saved the adapter")
    return config


def _module_names(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(name, str) for name in value))


def read_inference(path: Path) -> dict | None:
    """The `inference.json` at `path` (None when there is none), checked before any model loads: a JSON object whose
    `label_names` is a list of label texts, `max_new_tokens` a count >= 1 and `encode` a string, each or null."""
    if not path.is_file():
        return None
    inference = read_json(path)
    problem = None
    if not isinstance(inference, dict):
        problem = f"must be a JSON object (label_names, max_new_tokens, encode), got a {type(inference).__name__}"
    elif inference.get("label_names") is not None and not (
            isinstance(inference["label_names"], list) and inference["label_names"]
            and all(isinstance(name, str) for name in inference["label_names"])):
        problem = f"label_names: must be a list of label texts, got {_shown(inference['label_names'])}"
    elif inference.get("max_new_tokens") is not None and (
            type(inference["max_new_tokens"]) is not int or inference["max_new_tokens"] < 1):
        problem = f"max_new_tokens: must be a whole number >= 1, got {_shown(inference['max_new_tokens'])}"
    elif inference.get("encode") is not None and not isinstance(inference["encode"], str):
        problem = f"encode: must be a string, got {_shown(inference['encode'])}"
    if problem is not None:
        raise RecipeError(f"{path}: {problem}; the file is damaged or was edited: restore it from the run that saved "
                          "the adapter")
    return inference


def _shown(value) -> str:
    return json.dumps(value)[:60]


def check_weights(folder: Path) -> Path:
    """The adapter weights file of `folder`, checked to be whole (its safetensors header reads and covers the file);
    a missing, empty, truncated or foreign file is one [`InputError`]."""
    path = next((folder / name for name in WEIGHTS_FILES if (folder / name).is_file()), None)
    if path is None:
        raise InputError(
            f"{folder}: holds adapter_config.json but no adapter weights ({WEIGHTS_FILES[0]}); the save did not "
            "finish or the file was removed: use a whole checkpoint-N folder or train again"
        )
    if path.suffix == ".safetensors":
        tensors = safetensors_header(path)  # the check that resuming makes of a checkpoint's files
        if tensors is None:
            raise InputError(
                f"{path}: not a whole safetensors file (its header does not read, or does not cover the file); it is "
                "truncated or damaged: use a whole checkpoint-N folder or train again"
            )
        if not tensors:
            raise InputError(f"{path}: holds no tensors; it is not the weights of an adapter")
    check_vectors(path, read_weights(path))
    return path


def read_weights(path: Path) -> dict:
    """The tensors of an adapter weights file (safetensors, or peft's older `adapter_model.bin`, read without
    running any code it holds)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file: safetensors' and torch's own errors
        raise InputError(f"{path}: cannot read the adapter weights ({first_line(error)}); use a whole checkpoint-N "
                         "folder or train again") from None
    if not isinstance(weights, dict):
        raise InputError(f"{path}: holds a {type(weights).__name__}, not the tensors of an adapter")
    return weights


def check_vectors(path: Path, weights: dict) -> None:
    """The file holds IA3 vectors (`*.ia3_l` keys), all of them finite: another model's tensors or a NaN-filled
    adapter would load with at most a warning and predict as the base model, or as nothing."""
    import torch

    if not any(key.endswith(".ia3_l") or ".ia3_l." in key for key in weights):
        shown = ", ".join(sorted(weights)[:3])
        raise InputError(f"{path}: holds none of the IA3 vectors (keys ending in .ia3_l; it holds {shown}, ...): it "
                         "is not the weights of an IA3 adapter; use the adapter_model.safetensors its training saved")
    bad = [key for key, value in weights.items() if torch.is_tensor(value) and value.is_floating_point()
           and not bool(torch.isfinite(value).all())]
    if bad:
        raise InputError(f"{path}: {len(bad)} IA3 vector(s) hold NaN or infinite values (e.g. {bad[0]}); the "
                         "training diverged or the file is damaged: use an earlier checkpoint-N or train again")


def check_loaded(model, adapter_name: str, path: Path, weights: dict | None = None) -> None:
    """After peft loaded `path` into `model` as `adapter_name`: every IA3 vector the model has for it was in the
    file (peft only warns about a missing one, which then keeps its initial value of 1, the base model's output)."""
    from peft import get_peft_model_state_dict

    weights = read_weights(path) if weights is None else weights
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise InputError(f"{path}: has no IA3 vector for {len(missing)} of the model's {len(expected)} IA3 layers "
                         f"(e.g. {missing[0]}); it is not an adapter of this base model, or the file is incomplete")


def base_model_path(config: dict, folder: Path, recipe: Recipe | None = None) -> str:
    """The base model of an adapter.

    A `model.init: random` run has no base to download: its final save keeps it in `base-model/` beside the adapter
    (and records an absolute path, which breaks once the folder is moved or pushed), and its `checkpoint-*` folders
    still point at the config-only folder. For those, the `base-model/` of the folder or of its parent is used.
    """
    name = config.get("base_model_name_or_path")
    where = folder / "adapter_config.json"
    random_init = recipe is not None and recipe.model.init == "random"
    if random_init or not name or (Path(name).is_absolute() and not Path(name).exists()):
        for local_copy in (folder / "base-model", folder.parent / "base-model"):
            if (local_copy / "config.json").is_file():
                return str(local_copy)
        if random_init:
            raise InputError(
                f"{where}: the base model was built with random weights (model.init: random) and is saved as "
                "base-model/ only when training finishes; load the finished output_dir instead"
            )
    if not name or not isinstance(name, str):
        raise InputError(f"{where}: base_model_name_or_path: is empty; set the base model")
    return name


def same_base(name: str | None) -> str | None:
    """A base model name to compare with another: a local folder as its resolved path, a Hub id as it is."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name
