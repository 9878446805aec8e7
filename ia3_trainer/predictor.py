"""`IA3Predictor`: load a base model with one or more trained adapters and turn texts into labels.

An adapter folder (a training `output_dir`, a `checkpoint-*` folder, or a Hub repo holding the same files) has
`adapter_config.json`, the adapter weights, the tokenizer and the `recipe.json` of the run. The predictor reads the
recipe for what training fed the model (`data.source_prefix`, `data.max_source_length`, the label set), so a text
is encoded exactly as in training. `merge_adapter` folds the IA3 vectors into the base weights.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._schema import read_json
from .checkpoints import checkpoint_folders
from .data import build_collator
from .errors import RecipeError
from .errors import first_line as _first_line
from .metrics import IGNORE_INDEX, decode
from .recipe import DataSection, Recipe


logger = logging.getLogger(__name__)

# Files of a Hub adapter repo that loading never needs: intermediate checkpoints and TensorBoard logs.
_HUB_IGNORE = ["checkpoint-*", "runs/*", "*.pt", "*.pth", "*.bin.index.json"]
# Tokenizers without a real limit report this sentinel (transformers' VERY_LARGE_INTEGER) as model_max_length.
_NO_LIMIT = 10**12


@dataclass
class AdapterSettings:
    """How texts reach one adapter, from the `recipe.json` saved beside it (defaults when there is none).

    source (`str`): where the adapter was loaded from.
    data ([`DataSection`], *optional*): the recipe's `data` section; None for an adapter trained elsewhere.
    max_source_length (`int`, *optional*): source token limit; longer texts are truncated (None: no limit).
    max_new_tokens (`int`, *optional*): generation bound: the longest label of the label set, else
        `data.max_target_length`, else the model's generation config.
    folder (`Path`, *optional*): the local folder of the adapter files (a Hub repo's download).
    """

    source: str
    data: DataSection | None = None
    max_source_length: int | None = None
    max_new_tokens: int | None = None
    folder: Path | None = None

    @property
    def source_prefix(self) -> str:
        return self.data.source_prefix if self.data is not None else ""

    @property
    def label_names(self) -> list[str] | None:
        return self.data.label_names if self.data is not None else None


@dataclass
class Scores:
    """Per-example results of [`IA3Predictor.score`]: generated and teacher-forced texts, token NLL sums."""

    predictions: list[str]
    references: list[str]
    teacher_forced: list[str]
    nll_sum: np.ndarray
    token_count: np.ndarray


class IA3Predictor:
    """Generate labels with a base model and one or more adapters; switch adapters without reloading the base.

    Args:
        model (`peft.PeftModel`):
            Seq2seq model with its adapter(s), e.g. `trainer.model` right after training.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer the adapter was trained with.
        recipe ([`Recipe`] or `dict`, *optional*):
            Recipe of the active adapter: its `data` section says how texts are encoded.
        device (`str` or `torch.device`, *optional*):
            Where to run; defaults to where the model already is.

    Example:

    ```python
    >>> from ia3_trainer import IA3Predictor
    >>> predictor = IA3Predictor.from_pretrained("outputs/tiny")
    >>> predictor.predict(["Juniper Retail said its net sales rose by 12 % ."])
    ['positive']
    ```
    """

    def __init__(self, model, tokenizer, *, recipe: Recipe | dict | None = None, device=None, source: str = "<model>"):
        import torch

        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.tokenizer = tokenizer
        self._settings = {self.active_adapter: self._settings_for(recipe, source)}
        self._warned_truncation = False

    # --- loading --------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, dir_or_repo: str | Path, *, revision: str | None = None, device=None,
                        adapter_name: str = "default") -> IA3Predictor:
        """Load the base model named in the adapter's `adapter_config.json`, then the adapter and its tokenizer.

        `dir_or_repo` is a local adapter folder or a Hub repo id (`revision` picks a branch, tag or commit of that
        repo). Every failure is a one-line [`RecipeError`]: a folder without an adapter, a Hub repo that cannot be
        reached, a base model that cannot be loaded. `device` defaults to CUDA when available, else CPU.
        """
        import torch
        from peft import PeftModel

        folder = resolve_adapter(dir_or_repo, revision)
        config = read_json(folder / "adapter_config.json")
        recipe = _read_recipe(folder)
        base_name = base_model_path(config, folder, recipe)
        model_section = (recipe or {}).get("model") or {}
        tokenizer = _load_tokenizer(folder if (folder / "tokenizer_config.json").is_file() else base_name)
        base = _load_base_model(
            base_name, revision=config.get("revision") or model_section.get("revision"),
            dtype=model_section.get("dtype", "auto"), where=folder / "adapter_config.json",
        )
        try:
            model = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise RecipeError(
                f"{dir_or_repo}: cannot load the adapter onto {base_name!r}: {_first_line(error)}; was it trained "
                "on this base model?"
            ) from error
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        predictor = cls(model, tokenizer, recipe=recipe, device=device, source=str(dir_or_repo))
        predictor.settings.folder = folder
        return predictor

    def load_adapter(self, dir_or_repo: str | Path, adapter_name: str, *, revision: str | None = None) -> None:
        """Load another adapter onto the same base model under `adapter_name`; activate it with `set_adapter`."""
        if adapter_name in self.adapters:
            raise RecipeError(f"adapter name {adapter_name!r} is already loaded ({self.adapters}); pick another name")
        folder = resolve_adapter(dir_or_repo, revision)
        config = read_json(folder / "adapter_config.json")
        base_name = base_model_path(config, folder, _read_recipe(folder))
        current = self.model.peft_config[self.active_adapter].base_model_name_or_path
        if current and base_name != current:
            logger.warning("Adapter %s was trained on %s, not on the loaded base %s; its predictions may be wrong",
                           dir_or_repo, base_name, current)
        try:
            self.model.load_adapter(str(folder), adapter_name=adapter_name)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise RecipeError(
                f"{dir_or_repo}: cannot load the adapter onto {current!r}: {_first_line(error)}; adapters loaded "
                "together must share one base model"
            ) from error
        self._settings[adapter_name] = self._settings_for(_read_recipe(folder), str(dir_or_repo))
        self._settings[adapter_name].folder = folder

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that `predict` and `score` use."""
        if adapter_name not in self.adapters:
            raise RecipeError(f"no adapter named {adapter_name!r}; loaded adapters: {self.adapters}")
        self.model.set_adapter(adapter_name, inference_mode=True)

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return list(getattr(self.model, "peft_config", {}) or ["default"])

    @property
    def active_adapter(self) -> str:
        return getattr(self.model, "active_adapter", "default")

    @property
    def settings(self) -> AdapterSettings:
        """[`AdapterSettings`] of the active adapter."""
        return self._settings[self.active_adapter]

    # --- inference ------------------------------------------------------------------------------------------------

    def predict(self, texts: str | list[str], *, batch_size: int = 32, max_new_tokens: int | None = None,
                progress: bool | None = None) -> list[str]:
        """Generate the label of each text (greedy, as in evaluation). An empty text is a [`RecipeError`]; a text
        over the source limit is truncated, with one warning. `progress` shows a bar (default: over one batch)."""
        texts = check_texts([texts] if isinstance(texts, str) else list(texts))
        features = self._encode(texts)
        predictions: list[str] = []
        for batch in self._batches(features, batch_size, progress, "Predicting"):
            predictions.extend(decode(self._generate(batch, max_new_tokens).cpu().numpy(), self.tokenizer))
        return predictions

    def score(self, dataset, *, batch_size: int = 32, max_new_tokens: int | None = None,
              progress: bool | None = None) -> Scores:
        """Generate, and score teacher-forced, every example of a tokenized dataset (`input_ids`, `labels`, as
        `data.tokenize` makes them). References are the decoded labels, as in the trainer's `label_accuracy`."""
        import torch

        from .trainer import token_nll

        rows = [{key: row[key] for key in ("input_ids", "attention_mask", "labels") if key in row} for row in dataset]
        generated, teacher_forced, references, nll_sums, counts = [], [], [], [], []
        for batch in self._batches(rows, batch_size, progress, "Evaluating", with_model=True):
            labels = batch["labels"]
            with torch.inference_mode():
                logits = self.model(**batch).logits
            nll_sum, token_count = token_nll(logits, labels)
            # The PEFT guide's metric: argmax at each label position given the gold previous tokens.
            argmax = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, logits.argmax(dim=-1))
            teacher_forced.extend(decode(argmax.cpu().numpy(), self.tokenizer))
            references.extend(decode(labels.cpu().numpy(), self.tokenizer))
            nll_sums.append(nll_sum.cpu().numpy())
            counts.append(token_count.cpu().numpy())
            generated.extend(decode(self._generate(batch, max_new_tokens).cpu().numpy(), self.tokenizer))
        return Scores(generated, references, teacher_forced, np.concatenate(nll_sums) if nll_sums else np.zeros(0),
                      np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64))

    # --- helpers --------------------------------------------------------------------------------------------------

    def _settings_for(self, recipe: Recipe | dict | None, source: str) -> AdapterSettings:
        raw = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
        data = _data_section((raw or {}).get("data"))
        limit = getattr(self.tokenizer, "model_max_length", None)
        settings = AdapterSettings(
            source=source, data=data,
            max_source_length=data.max_source_length if data else (limit if limit and limit < _NO_LIMIT else None),
        )
        if data is not None and data.label_names:
            lengths = [len(ids) for ids in self.tokenizer(text_target=list(data.label_names))["input_ids"]]
            settings.max_new_tokens = max(lengths)
        elif data is not None:
            settings.max_new_tokens = data.max_target_length
        return settings

    def _encode(self, texts: list[str]) -> list[dict]:
        settings = self.settings
        sources = [settings.source_prefix + text for text in texts]
        limit = settings.max_source_length
        encoded = self.tokenizer(sources, max_length=limit, truncation=limit is not None)["input_ids"]
        if limit is not None and not self._warned_truncation:
            at_limit = [i for i, ids in enumerate(encoded) if len(ids) >= limit]
            full = self.tokenizer([sources[i] for i in at_limit])["input_ids"] if at_limit else []
            cut = [i for i, ids in zip(at_limit, full, strict=True) if len(ids) > limit]
            if cut:
                self._warned_truncation = True
                logger.warning(
                    "%d of %d texts are longer than the %d-token source limit (data.max_source_length of the "
                    "adapter's recipe) and were truncated, e.g. text %d; later truncations are not reported",
                    len(cut), len(texts), limit, cut[0] + 1,
                )
        return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in encoded]

    def _batches(self, rows: list[dict], batch_size: int, progress: bool | None, desc: str, with_model: bool = False):
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise RecipeError(f"batch_size: must be >= 1, got {batch_size}")
        # The trainer's collator (same padding multiple), so predictions match the ones made in evaluation.
        collate = build_collator(self.tokenizer, self.model if with_model else None)
        starts = range(0, len(rows), batch_size)
        show = len(starts) > 1 if progress is None else progress
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show):
            yield collate(rows[start:start + batch_size]).to(self.device)

    def _generate(self, batch, max_new_tokens: int | None):
        import torch

        bound = max_new_tokens or self.settings.max_new_tokens
        with torch.inference_mode():
            # As max_length (decoder start + new tokens), as the trainer's evaluation does: it replaces the model's
            # default max_length instead of racing it (transformers warns when both are set).
            return self.model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                **({"max_length": bound + 1} if bound else {}),
            )


def check_texts(texts: list) -> list[str]:
    """Return `texts` if each is a non-empty string, else raise a [`RecipeError`] naming the first bad one."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RecipeError(f"text {i + 1}: must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RecipeError(f"text {i + 1}: is empty; give each text something to classify")
    return texts


def merge_adapter(dir_or_repo: str | Path, merged_dir: str | Path, *, revision: str | None = None) -> Path:
    """Fold the adapter's IA3 vectors into the base weights and save a plain transformers model plus tokenizer.

    The merged model loads with `AutoModelForSeq2SeqLM.from_pretrained(merged_dir)` and has exactly the base
    model's parameters. A separate output head (mt0, mT5, flan-t5) is saved with `tie_word_embeddings: false`.
    """
    from .trainer import untie_separate_lm_head

    merged_dir = Path(merged_dir)
    if Path(dir_or_repo).is_dir() and merged_dir.resolve() == Path(dir_or_repo).resolve():
        raise RecipeError(f"{merged_dir}: is the adapter folder itself; give a new folder for the merged model")
    predictor = IA3Predictor.from_pretrained(dir_or_repo, revision=revision, device="cpu")
    merged = predictor.model.merge_and_unload(safe_merge=True)
    untie_separate_lm_head(merged)
    merged.save_pretrained(merged_dir)
    predictor.tokenizer.save_pretrained(merged_dir)
    return merged_dir


def resolve_adapter(dir_or_repo: str | Path, revision: str | None = None) -> Path:
    """The local folder holding the adapter: `dir_or_repo` itself, or a download of the Hub repo of that id."""
    path = Path(dir_or_repo).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            checkpoints = [c for c in checkpoint_folders(path) if (c / "adapter_config.json").is_file()]
            hint = (f"its latest checkpoint {checkpoints[0]} has one" if checkpoints
                    else "pass the training.output_dir of a finished run")
            raise RecipeError(f"{dir_or_repo}: holds no adapter (no adapter_config.json); {hint}")
        return path
    if path.exists():
        raise RecipeError(f"{dir_or_repo}: is a file; pass the folder that holds adapter_config.json")
    text = str(dir_or_repo)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise RecipeError(f"{dir_or_repo}: no such folder; pass a training output_dir, or a Hub repo id (user/name)")
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(str(dir_or_repo), revision=revision, ignore_patterns=_HUB_IGNORE))
    except (OSError, ValueError) as error:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise RecipeError(
            f"{dir_or_repo}: no such local folder, and no Hub repo of that id could be loaded{offline}: "
            f"{_first_line(error)}; check the path, or the repo id, the network and HF_TOKEN for a private repo"
        ) from error
    if not (folder / "adapter_config.json").is_file():
        raise RecipeError(f"{dir_or_repo}: the Hub repo holds no adapter_config.json; is it an adapter repo?")
    return folder


def base_model_path(config: dict, folder: Path, recipe: dict | None = None) -> str:
    """The base model of an adapter.

    A `model.init: random` run has no base to download: its final save keeps it in `base-model/` beside the adapter
    (and records an absolute path, which breaks once the folder is moved or pushed), and its `checkpoint-*` folders
    still point at the config-only folder. For those, the `base-model/` of the folder or of its parent is used.
    """
    name = config.get("base_model_name_or_path")
    where = folder / "adapter_config.json"
    random_init = ((recipe or {}).get("model") or {}).get("init") == "random"
    if random_init or not name or (Path(name).is_absolute() and not Path(name).exists()):
        for local_copy in (folder / "base-model", folder.parent / "base-model"):
            if (local_copy / "config.json").is_file():
                return str(local_copy)
        if random_init:
            raise RecipeError(
                f"{where}: the base model was built with random weights (model.init: random) and is saved as "
                "base-model/ only when training finishes; load the finished output_dir instead"
            )
    if not name:
        raise RecipeError(f"{where}: base_model_name_or_path: is empty; set the base model")
    return name


def _load_base_model(name: str, *, revision: str | None, dtype: str, where: Path):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from .trainer import untie_separate_lm_head

    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            name, revision=revision, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
        )
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"{where}: base_model_name_or_path: cannot load {name!r}: {_first_line(error)}; check the network, "
            "or download the base model and set the path there"
        ) from error
    untie_separate_lm_head(model)
    return model


def _load_tokenizer(name: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise RecipeError(f"{name}: cannot load a tokenizer: {_first_line(error)}") from error


def _read_recipe(folder: Path) -> dict | None:
    path = folder / "recipe.json"
    return read_json(path) if path.is_file() else None


def _data_section(raw: dict | None) -> DataSection | None:
    """The recipe's `data` section as saved; not re-validated, so a recipe from another machine still loads."""
    if not isinstance(raw, dict) or "path" not in raw:
        return None
    names = {f.name for f in dataclasses.fields(DataSection)}
    return DataSection(**{key: value for key, value in raw.items() if key in names})
