"""`IA3Predictor`: load a base model with one or more trained adapters and turn texts into labels.

An adapter folder (a training `output_dir`, a `checkpoint-*` folder, or a Hub repo holding the same files) has
`adapter_config.json`, the adapter weights, the tokenizer and the `recipe.json` of the run. The predictor reads the
recipe for what training fed the model (`data.source_prefix`, `data.max_source_length`, the label set), so a text
is encoded exactly as in training, through the same `encode` function (`inference.json` says which one training
used). Several adapters share one base model, and one batch may mix them: each text then goes through its own
adapter's encoding, vectors, label set and generation bound (`ia3_trainer.modeling.layers.adapter_rows`).
`load_adapter_model` loads a base model with its adapter, for predicting and for
`ia3_trainer.inference.merging.merge_adapter`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ia3_trainer.data.encoding import build_collator, cut_sources, encode_batch
from ia3_trainer.errors import InputError, first_line
from ia3_trainer.evaluation.metrics import decode
from ia3_trainer.inference.adapters import AdapterFolder, check_loaded, check_weights, read_adapter, same_base
from ia3_trainer.modeling import loading as modeling
from ia3_trainer.modeling.layers import check_adapter_names, install
from ia3_trainer.modeling.mixed import score_rows
from ia3_trainer.modeling.scoring import EvalOutputs, candidate_label_ids, score_batch
from ia3_trainer.modeling.threads import cpu_threads
from ia3_trainer.recipe.loading import DataSection, ModelSection, Recipe
from ia3_trainer.recipe.sections import MAX_TOKENS
from ia3_trainer.recipe.training_args import stderr_is_terminal


logger = logging.getLogger(__name__)


@dataclass
class AdapterSettings:
    """How texts reach one adapter, from the `recipe.json` saved beside it (defaults when there is none).

    source (`str`): where the adapter was loaded from.
    data ([`DataSection`], *optional*): the recipe's `data` section; None for an adapter trained elsewhere.
    max_source_length (`int`, *optional*): source token limit; longer texts are truncated (None: no limit).
    max_new_tokens (`int`, *optional*): generation bound: `inference.json`'s, else the longest label of the label
        set, else `data.max_target_length`, else the model's generation config.
    label_names (`list[str]`, *optional*): the label set training used (`inference.json`, else the recipe's).
    folder (`Path`, *optional*): the local folder of the adapter files (a Hub repo's download).
    base_model (`str`, *optional*): the base model it was trained on; adapters of different bases never share a batch.
    """

    source: str
    data: DataSection | None = None
    max_source_length: int | None = None
    max_new_tokens: int | None = None
    label_names: list[str] | None = None
    folder: Path | None = None
    base_model: str | None = None

    @property
    def source_prefix(self) -> str:
        return self.data.source_prefix if self.data is not None else ""


class IA3Predictor:
    """Generate labels with a base model and one or more adapters; switch adapters without reloading the base.

    Args:
        model (`peft.PeftModel`):
            Seq2seq model with its adapter(s), e.g. `trainer.model` right after training.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer the adapter was trained with.
        recipe ([`Recipe`], *optional*):
            Recipe of the active adapter: its `data` section says how texts are encoded.
        data ([`DataSection`], *optional*):
            That `data` section alone, for a model trained without a recipe (ignored when `recipe` is given).
        inference (`dict`, *optional*):
            The adapter's `inference.json`: label set, generation bound, and which `encode` training used.
        encode (`Callable`, *optional*):
            `encode(batch, tokenizer, data) -> model inputs`, the function training encoded with (a trainer's
            `preprocess`); defaults to `ia3_trainer.data.encoding.encode_batch`, what `IA3Seq2SeqTrainer.preprocess`
            runs.
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

    def __init__(self, model, tokenizer, *, recipe: Recipe | None = None, data: DataSection | None = None,
                 inference: dict | None = None, encode=None, device=None, source: str = "<model>"):
        import torch

        self.model = model.eval()
        install(self.model)  # the IA3 forward that mixed batches need (and that scales in the compute dtype)
        if device is not None:
            self.model.to(device)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.tokenizer = tokenizer
        self._encoders = {}
        self._settings = {}
        if recipe is not None and not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a Recipe (ia3_trainer.load_recipe), got {type(recipe).__name__}")
        config = (getattr(model, "peft_config", None) or {}).get(self.active_adapter)
        self._register(self.active_adapter, recipe.data if recipe is not None else data, inference, encode, source,
                       getattr(config, "base_model_name_or_path", None))
        self._warned_truncation = False

    @classmethod
    def from_trainer(cls, trainer) -> IA3Predictor:
        """A predictor on a trainer's model, encoding as that trainer's `preprocess` does."""
        return cls(trainer.model, trainer.processing_class, recipe=trainer.recipe,
                   inference=trainer.inference_settings(), encode=type(trainer).preprocess,
                   source=str(trainer.args.output_dir))

    # --- loading --------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, dir_or_repo: str | Path, *, revision: str | None = None, device=None,
                        adapter_name: str = "default", encode=None,
                        trust_remote_code: bool = False) -> IA3Predictor:
        """Load the base model named in the adapter's `adapter_config.json`, then the adapter and its tokenizer.

        `dir_or_repo` is a local adapter folder or a Hub repo id (`revision` picks a branch, tag or commit of that
        repo). Every failure is one line: a folder without an adapter or a Hub repo that cannot be reached
        ([`InputError`], [`HubError`]), a base model that cannot be loaded (naming the field). `device` defaults to
        CUDA when available, else CPU. `encode` is the trainer's `preprocess` for adapters trained with a custom one.
        Code shipped with the base model or tokenizer runs only with `trust_remote_code=True`, whatever the adapter's
        own `recipe.json` says (an adapter from the Hub is data, not permission).
        """
        import torch

        adapter = read_adapter(dir_or_repo, revision)
        model, tokenizer = load_adapter_model(adapter, dir_or_repo, adapter_name, trust_remote_code=trust_remote_code)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        predictor = cls(model, tokenizer, recipe=adapter.recipe, inference=adapter.inference, encode=encode,
                        device=device, source=str(dir_or_repo))
        predictor.settings.folder, predictor.settings.base_model = adapter.folder, same_base(adapter.base_model)
        return predictor

    def load_adapter(self, dir_or_repo: str | Path, adapter_name: str, *, revision: str | None = None,
                     encode=None) -> None:
        """Load another adapter onto the same base model under `adapter_name`; activate it with `set_adapter`, or
        name it per text (`predict(texts, adapter=[...])`). An adapter trained on another base model loads with a
        warning (its predictions may be wrong), and is refused in a batch with adapters of the loaded base."""
        if adapter_name in self.adapters:
            raise InputError(f"adapter name {adapter_name!r} is already loaded ({self.adapters}); pick another name")
        adapter = read_adapter(dir_or_repo, revision)
        base_name, current = adapter.base_model, self.settings.base_model
        if current and same_base(base_name) != current:
            logger.warning("Adapter %s was trained on %s, not on the loaded base %s; its predictions may be wrong",
                           dir_or_repo, base_name, current)
        try:
            self.model.load_adapter(str(adapter.folder), adapter_name=adapter_name)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise InputError(
                f"{dir_or_repo}: cannot load the adapter onto {current!r}: {first_line(error)}; adapters loaded "
                "together must share one base model"
            ) from error
        try:
            check_loaded(self.model, adapter_name, check_weights(adapter.folder))
        except ValueError:
            self.model.delete_adapter(adapter_name)  # the predictor stays as it was
            raise
        install(self.model)
        data = adapter.recipe.data if adapter.recipe else None
        self._register(adapter_name, data, adapter.inference, encode, str(dir_or_repo), base_name, adapter.folder)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that `predict` and `score` use."""
        if adapter_name not in self.adapters:
            raise InputError(f"no adapter named {adapter_name!r}; loaded adapters: {self.adapters}")
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

    def adapter_settings(self, adapter_name: str) -> AdapterSettings:
        """[`AdapterSettings`] of the loaded adapter `adapter_name` (how its texts are encoded, its label set)."""
        if adapter_name not in self._settings:
            raise InputError(f"no adapter named {adapter_name!r}; loaded adapters: {self.adapters}")
        return self._settings[adapter_name]

    # --- inference ------------------------------------------------------------------------------------------------

    def predict(self, texts: str | list[str], *, adapter: str | list[str] | None = None, batch_size: int = 32,
                max_new_tokens: int | None = None, progress: bool | None = None) -> list[str]:
        """Generate the label of each text (greedy, as in evaluation). `adapter` names the loaded adapter of each text
        (one name for all, or a list with one name per text; default: the active adapter): a batch that mixes
        adapters is one forward, in which each text is encoded, scaled and bounded as by its adapter alone (texts are
        batched in order of their generation bound, and come back in the order given). A text that is no string is
        a `TypeError`, an empty one an [`InputError`] (a `ValueError`); a text over the source limit is truncated,
        with one warning.
        `progress` shows a bar (default: over one batch, on a terminal)."""
        texts = check_texts([texts] if isinstance(texts, str) else list(texts))
        rows = self._row_adapters(adapter, len(texts))
        predictions = [""] * len(texts)
        features = self.encode(texts, rows)
        for index, batch in self._batches(features, rows, max_new_tokens, batch_size, progress, "Predicting"):
            scores = self._score_batch(batch, [rows[i] for i in index], adapter is not None, max_new_tokens)
            for i, prediction in zip(index, decode(scores.generated.cpu().numpy(), self.tokenizer), strict=True):
                predictions[i] = prediction
        return predictions

    def score(self, dataset, *, adapter: str | list[str] | None = None, batch_size: int = 32,
              max_new_tokens: int | None = None, rank: bool = True, progress: bool | None = None) -> EvalOutputs:
        """Score every example of a tokenized dataset (`input_ids`, `labels`, as `data.tokenize` makes them) with the
        trainer's evaluation kernel ([`ia3_trainer.modeling.scoring.score_batch`]): token losses, the teacher-forced
        argmax, rank classification over the adapter's label set (with `rank`), and bounded greedy generation.
        `adapter` is as in `predict`, one name per example (tokenized with that adapter's recipe); each example is
        ranked over its own adapter's label set (`rank_choice` -1 for an example whose adapter has none, when others
        have one)."""
        columns = ("input_ids", "attention_mask", "labels")
        examples = [{key: row[key] for key in columns if key in row} for row in dataset]
        rows = self._row_adapters(adapter, len(examples))
        candidates = {name: candidate_label_ids(self.tokenizer, self._settings[name].label_names)
                      for name in dict.fromkeys(rows) if rank and self._settings[name].label_names}
        parts, order = [], []
        for index, batch in self._batches(examples, rows, max_new_tokens, batch_size, progress, "Evaluating", True):
            scores = self._score_batch(batch, [rows[i] for i in index], adapter is not None, max_new_tokens,
                                       candidates)
            part = {name: tensor.cpu().numpy() for name, tensor in scores.as_dict().items()}
            parts.append({**part, "labels": batch["labels"].cpu().numpy()})
            order += index
        outputs, back = EvalOutputs.concatenate(parts), np.argsort(order, kind="stable")
        return EvalOutputs(**{key: value[back] for key, value in vars(outputs).items() if value is not None})

    def _score_batch(self, batch, rows: list[str], per_row: bool, max_new_tokens: int | None, candidates=None):
        """One `score_batch`; with `per_row`, each row through its own adapter
        ([`ia3_trainer.modeling.mixed.score_rows`])."""
        bounds = [self._bound(name, max_new_tokens) for name in rows]
        with cpu_threads(self.model, self.model.device):  # one thread for a small model on the CPU
            if per_row:
                return score_rows(self.model, batch, rows, bounds=bounds, candidates=candidates,
                                  pad_token_id=self.tokenizer.pad_token_id)
            return score_batch(self.model, batch, candidate_ids=(candidates or {}).get(rows[0]),
                               max_new_tokens=bounds[0])

    def _row_adapters(self, adapter: str | list[str] | None, count: int) -> list[str]:
        """The adapter of each of `count` rows: the active one, or `adapter` checked (loaded names, one per row, all
        trained on the same base model)."""
        if adapter is None:
            return [self.active_adapter] * count
        names = check_adapter_names(adapter, self.adapters, count)
        names = names * count if isinstance(adapter, str) else names
        bases = {name: self._settings[name].base_model for name in dict.fromkeys(names)}
        if len({base for base in bases.values() if base}) > 1:
            listed = ", ".join(f"{name!r} on {base!r}" for name, base in bases.items())
            raise InputError(f"adapter: adapters trained on different base models cannot share a batch ({listed}); "
                             "predict with one at a time (set_adapter), or give each base its own IA3Predictor")
        return names

    # --- helpers --------------------------------------------------------------------------------------------------

    def _register(self, adapter: str, data: DataSection | None, inference: dict | None, encode, source: str,
                  base_model: str | None, folder: Path | None = None) -> None:
        inference = inference or {}
        marker = inference.get("encode")
        if encode is None and isinstance(marker, str) and marker.startswith("custom:"):
            raise InputError(
                f"{source}: was trained with a custom preprocess ({marker.removeprefix('custom:')}); encode texts the "
                "same way: from Python, IA3Predictor.from_pretrained(..., encode=YourTrainer.preprocess)"
            )
        self._encoders[adapter] = encode or encode_batch
        # Without a recipe, the tokenizer's own limit; one without a real limit says VERY_LARGE_INTEGER (1e30).
        limit = getattr(self.tokenizer, "model_max_length", None)
        settings = AdapterSettings(
            source=source, data=data, folder=folder, base_model=same_base(base_model),
            max_source_length=data.max_source_length if data else (limit if limit and limit <= MAX_TOKENS else None),
            label_names=inference.get("label_names") or (data.label_names if data else None),
        )
        if inference.get("max_new_tokens"):
            settings.max_new_tokens = inference["max_new_tokens"]
        elif settings.label_names:
            settings.max_new_tokens = candidate_label_ids(self.tokenizer, settings.label_names).shape[1]
        elif data is not None:
            settings.max_new_tokens = data.max_target_length
        self._settings[adapter] = settings

    def encode(self, texts: list[str], adapter: str | list[str] | None = None) -> list[dict]:
        """The model inputs (`input_ids`, `attention_mask`) of each text for its adapter (`adapter` as in `predict`),
        through the encode function training used (its `source_prefix`, `max_source_length`, prompt template)."""
        rows = self._row_adapters(adapter, len(texts))
        encoded, cut = [None] * len(texts), []
        for name in dict.fromkeys(rows):
            index = [i for i, row in enumerate(rows) if row == name]
            settings, encode = self._settings[name], self._encoders[name]
            data = settings.data or DataSection(path="<inference>",
                                                max_source_length=settings.max_source_length or MAX_TOKENS)
            batch = {data.text_column: [texts[i] for i in index]}
            ids = encode(batch, self.tokenizer, data)["input_ids"]
            for i, row_ids in zip(index, ids, strict=True):
                encoded[i] = row_ids
            if settings.max_source_length is not None and not self._warned_truncation:
                cut += [(index[position], data.max_source_length)
                        for position in cut_sources(batch, ids, self.tokenizer, data, encode)]
        if cut:
            self._warned_truncation = True
            first, limit = min(cut)
            logger.warning(
                "%d of %d texts are longer than the %d-token source limit (data.max_source_length of the adapter's "
                "recipe) and were truncated, e.g. text %d; later truncations are not reported",
                len(cut), len(texts), limit, first + 1,
            )
        return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in encoded]

    def _bound(self, adapter: str, max_new_tokens: int | None) -> int | None:
        return max_new_tokens or self._settings[adapter].max_new_tokens

    def _batches(self, rows: list[dict], names: list[str], max_new_tokens: int | None, batch_size: int,
                 progress: bool | None, desc: str, with_model: bool = False):
        """(positions, collated batch) over `rows` in order of generation bound: a batch of rows with one adapter or
        with equal bounds never generates longer than each would alone (with one adapter, the order given)."""
        from tqdm.auto import tqdm

        counts = {"batch_size": batch_size, **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: must be an int, got {type(value).__name__}")
            if value < 1:
                raise InputError(f"{name}: must be >= 1, got {value}")
        # The trainer's collator (same padding multiple), so predictions match the ones made in evaluation.
        collate = build_collator(self.tokenizer, self.model if with_model else None)
        order = sorted(range(len(rows)), key=lambda i: self._bound(names[i], max_new_tokens) or math.inf)
        starts = range(0, len(rows), batch_size)
        show = len(starts) > 1 and stderr_is_terminal() if progress is None else progress
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show):
            index = order[start:start + batch_size]
            yield index, collate([rows[i] for i in index]).to(self.device)


# How the person loading an adapter allows its base model's or tokenizer's own code.
REMOTE_CODE_TRUST = "you pass trust_remote_code=True (ia3-trainer: --trust-remote-code)"


def check_texts(texts: list) -> list[str]:
    """Return `texts` if each is a non-empty string, else raise `TypeError`/[`InputError`] naming the first bad one."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i + 1}: must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InputError(f"text {i + 1}: is empty; give each text something to classify")
    return texts


def load_adapter_model(adapter: AdapterFolder, source: str | Path, adapter_name: str = "default", *,
                       trust_remote_code: bool = False):
    """The base model named in the adapter's `adapter_config.json` with the adapter on it (a `peft.PeftModel`, on the
    CPU), and the adapter's tokenizer. Every failure is one line naming the field or the folder.

    Code shipped with the base model or the tokenizer runs only when the caller passes `trust_remote_code=True`.
    What the adapter says (its `recipe.json`'s `model.trust_remote_code`) is data from wherever the adapter came
    from, never permission: it is not read here."""
    from peft import PeftModel

    folder, recipe, base_name = adapter.folder, adapter.recipe, adapter.base_model
    model_section = ModelSection(name_or_path=base_name, revision=adapter.config.get("revision"),
                                 dtype=recipe.model.dtype if recipe else "auto", trust_remote_code=trust_remote_code)
    trust = REMOTE_CODE_TRUST + (" (the adapter's recipe.json asks for it; an adapter cannot allow it)"
                                 if recipe is not None and recipe.model.trust_remote_code else "")
    tokenizer_source = folder if (folder / "tokenizer_config.json").is_file() else base_name
    tokenizer = modeling.load_tokenizer(dataclasses.replace(model_section, name_or_path=str(tokenizer_source)),
                                        key=f"{folder}: tokenizer", trust=trust)
    base = modeling.load_model(model_section, key=f"{folder / 'adapter_config.json'}: base_model_name_or_path",
                               trust=trust)
    try:
        with modeling.peft_wrapping():
            model = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise InputError(
            f"{source}: cannot load the adapter onto {base_name!r}: {first_line(error)}; was it trained "
            "on this base model?"
        ) from error
    check_loaded(model, adapter_name, check_weights(folder))
    return model, tokenizer
