"""`IA3Seq2SeqTrainer`: a `Seq2SeqTrainer` that sets up IA3 itself and reports perplexity and label accuracy."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer

from .data import build_collator, prepare_data
from .metrics import build_compute_metrics, perplexity
from .recipe import ModelSection, Recipe, RecipeError, _first_line, load_recipe
from .training_args import IA3TrainingArguments


logger = logging.getLogger(__name__)


class IA3Seq2SeqTrainer(Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] that trains an IA3 adapter on a seq2seq model.

    It wraps a plain model with `peft.get_peft_model` (or takes a ready IA3 `PeftModel`), pads batches
    dynamically, and evaluates by generating each label: `evaluate()` reports `eval_loss`, `eval_perplexity`
    (exp of the mean token loss over the whole eval set) and `eval_label_accuracy` (generated text equals the
    gold label text). `save_model()` writes the adapter only, the tokenizer and, from a recipe, `recipe.json`.

    Args:
        model ([`~transformers.PreTrainedModel`] or `peft.PeftModel`):
            Base seq2seq model to wrap, or a `PeftModel` that already has an IA3 adapter.
        args ([`IA3TrainingArguments`], *optional*):
            Training arguments; a plain [`~transformers.Seq2SeqTrainingArguments`] works too.
        peft_config (`peft.IA3Config`, *optional*):
            IA3 settings for a plain model; defaults to peft's per-architecture default.
        recipe ([`Recipe`], *optional*):
            The recipe this trainer was built from; saved as `recipe.json` with the adapter.
        candidate_labels (`list[str]`, *optional*):
            Label texts of a classification task (used by subclasses and reports).
        max_new_tokens (`int`, *optional*):
            Generation bound in evaluation; defaults to the longest label of the eval set.
        Other arguments are those of [`~transformers.Seq2SeqTrainer`]. `processing_class` (the tokenizer) is
        required, to decode generated labels.

    Example:

    ```python
    >>> from ia3_trainer import IA3Seq2SeqTrainer
    >>> trainer = IA3Seq2SeqTrainer.from_recipe("tiny", overrides={"training.max_steps": 2})
    >>> trainer.train().metrics["train_perplexity"] > 1
    True
    ```
    """

    _tag_names = ["ia3-trainer", "ia3", "peft"]

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        peft_config=None,
        recipe: Recipe | None = None,
        candidate_labels: list[str] | None = None,
        max_new_tokens: int | None = None,
        compute_metrics=None,
        **kwargs,
    ):
        if args is None:
            args = IA3TrainingArguments(output_dir="trainer_output")
        if processing_class is None:
            raise ValueError(
                "IA3Seq2SeqTrainer needs processing_class (the tokenizer) to decode generated labels; "
                "pass processing_class=AutoTokenizer.from_pretrained(...)"
            )
        if not args.predict_with_generate:
            # Evaluation always generates: label accuracy needs free-running output, and not keeping full-vocab
            # logits for the whole eval set is what keeps evaluation memory flat.
            logger.info("IA3Seq2SeqTrainer evaluates by generation; setting predict_with_generate=True")
            args.predict_with_generate = True
        model = self.wrap_model_with_ia3(model, peft_config)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or build_collator(processing_class, model),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or build_compute_metrics(processing_class),
            **kwargs,
        )
        self.recipe = recipe
        self.candidate_labels = candidate_labels
        self.max_new_tokens = max_new_tokens or _longest_labels(eval_dataset)
        if self.is_world_process_zero():
            self.model.print_trainable_parameters()

    # --- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, recipe: str | Path | dict | Recipe, overrides: dict | list[str] | None = None, **kwargs):
        """Build a ready trainer from a recipe name, file, dict or [`Recipe`], applying `overrides` first.

        Data is loaded and checked before the model, so a bad column or label fails before a large download.
        """
        if isinstance(recipe, Recipe):
            recipe = load_recipe(recipe.to_dict(), overrides) if overrides else recipe
        else:
            recipe = load_recipe(recipe, overrides)
        args = recipe.training_args()
        tokenizer = cls.load_tokenizer(recipe.model)
        prepared = prepare_data(recipe.data, tokenizer)
        model = cls.load_model(recipe.model, seed=args.seed)
        return cls(
            model,
            args,
            train_dataset=prepared.train_dataset,
            eval_dataset=prepared.eval_dataset,
            processing_class=tokenizer,
            peft_config=recipe.ia3_config(),
            recipe=recipe,
            candidate_labels=prepared.label_names,
            max_new_tokens=prepared.max_label_tokens,
            **kwargs,
        )

    @staticmethod
    def load_tokenizer(model: ModelSection):
        """Load the tokenizer named by the `model` section."""
        from transformers import AutoTokenizer

        name = model.tokenizer_name_or_path or model.name_or_path
        try:
            return AutoTokenizer.from_pretrained(name, revision=model.revision, trust_remote_code=model.trust_remote_code)
        except (OSError, ValueError) as error:
            key = "model.tokenizer_name_or_path" if model.tokenizer_name_or_path else "model.name_or_path"
            raise RecipeError(
                f"{key}: cannot load a tokenizer from {name!r}: {_first_line(error)}; check the id and the "
                "network, or point it at a local folder"
            ) from error

    @staticmethod
    def load_model(model: ModelSection, seed: int = 42) -> PreTrainedModel:
        """Load (or, with `init: random`, build from its config) the base model, with the untied-head guard."""
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, set_seed

        dtype = model.dtype if model.dtype == "auto" else getattr(torch, model.dtype)
        common = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
        try:
            if model.init == "random":
                config = AutoConfig.from_pretrained(model.name_or_path, **common)
                set_seed(seed)
                base = AutoModelForSeq2SeqLM.from_config(
                    config, trust_remote_code=model.trust_remote_code, dtype=None if dtype == "auto" else dtype
                )
            else:
                base = AutoModelForSeq2SeqLM.from_pretrained(model.name_or_path, dtype=dtype, **common)
        except (OSError, ValueError) as error:
            raise RecipeError(
                f"model.name_or_path: cannot load a seq2seq model from {model.name_or_path!r}: {_first_line(error)}; "
                "check the id and the network, or point it at a local folder"
            ) from error
        untie_separate_lm_head(base)
        return base

    @staticmethod
    def wrap_model_with_ia3(model, peft_config=None):
        """Return `model` wrapped with IA3, or the given IA3 `PeftModel` as it is."""
        from peft import IA3Config, PeftModel, PeftType, get_peft_model

        if peft_config is not None and not isinstance(peft_config, IA3Config):
            raise TypeError(f"peft_config must be a peft.IA3Config, got {type(peft_config).__name__}")
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError(
                    "You passed a PeftModel together with peft_config; pass the base model with peft_config, or "
                    "the PeftModel alone"
                )
            if model.peft_config[model.active_adapter].peft_type != PeftType.IA3:
                kind = model.peft_config[model.active_adapter].peft_type.value
                raise ValueError(f"IA3Seq2SeqTrainer trains IA3 adapters, but the PeftModel has a {kind} adapter")
            untie_separate_lm_head(model.get_base_model())
            return model
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"model must be a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}; "
                "to load by name use IA3Seq2SeqTrainer.from_recipe"
            )
        untie_separate_lm_head(model)
        peft_config = peft_config or IA3Config(task_type="SEQ_2_SEQ_LM")
        if peft_config.task_type is None:
            peft_config.task_type = "SEQ_2_SEQ_LM"  # without it get_peft_model returns a PeftModel with no generate
        try:
            return get_peft_model(model, peft_config)
        except ValueError as error:
            if peft_config.target_modules is None:
                raise ValueError(
                    f"ia3.target_modules: peft has no IA3 default for model type {model.config.model_type!r}; set "
                    "ia3.target_modules and ia3.feedforward_modules (e.g. [\"k_proj\", \"v_proj\", \"fc2\"] and "
                    "[\"fc2\"])"
                ) from error
            raise

    # --- training and logging -------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        """Train; then, when `args.save_final_adapter`, save the adapter, tokenizer and recipe to `output_dir`."""
        output = super().train(*args, **kwargs)
        if getattr(self.args, "save_final_adapter", False):
            self.save_model()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Perplexity next to every training loss; the eval loop adds eval_perplexity from exact token counts.
        # The dict is updated in place because train() returns the same dict it logs.
        for loss_key, key in (("loss", "perplexity"), ("train_loss", "train_perplexity")):
            if loss_key in logs and key not in logs:
                logs[key] = perplexity(logs[loss_key])
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (never the base weights), the tokenizer and `recipe.json` to `output_dir`.

        A base model built with `model.init: random` cannot be downloaded again, so the final save also keeps
        it in `output_dir/base-model` and points the adapter at it, so `AutoPeftModelForSeq2SeqLM` can load it.
        """
        output_dir = output_dir or self.args.output_dir
        if not _internal_call and self.recipe is not None and self.recipe.model.init == "random":
            base_dir = Path(output_dir) / "base-model"
            if self.args.should_save:
                self.model.get_base_model().save_pretrained(base_dir)
                self.processing_class.save_pretrained(base_dir)
            self.model.peft_config[self.model.active_adapter].base_model_name_or_path = str(base_dir.resolve())
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.recipe is not None:
            self.recipe.save(output_dir or self.args.output_dir)

    # --- evaluation -----------------------------------------------------------------------------------------------

    def evaluation_loop(self, *args, **kwargs):
        # Seq2SeqTrainer.evaluate switches to accelerator.gather, which keeps the copies that even batches add to
        # the last batch under DDP; metrics must count each example once, so gather for metrics instead.
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """One forward pass for the token losses, one bounded `generate` for the label text.

        Returns `(loss, (generated_ids, nll_sum, token_count), labels)`: per-example sums instead of logits, so
        perplexity is exact over the whole eval set and memory does not grow with vocab size.
        """
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        loss = nll_sum = token_count = None
        if labels is not None:
            with torch.no_grad(), self.compute_loss_context_manager():
                outputs = model(**inputs)
            nll_sum, token_count = token_nll(outputs.logits, labels)
            loss = nll_sum.sum() / token_count.sum().clamp(min=1)
        if prediction_loss_only:
            return loss, None, None

        gen_kwargs = {**getattr(self, "_gen_kwargs", {}), **gen_kwargs}
        if gen_kwargs.get("max_length") is None and gen_kwargs.get("max_new_tokens") is None and self.max_new_tokens:
            # As max_length (decoder start + label tokens), so it replaces the model's default of 20, not races it.
            gen_kwargs["max_length"] = self.max_new_tokens + 1
        gen_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "decoder_input_ids", "decoder_attention_mask")}
        _, generated, _ = super().prediction_step(
            model, gen_inputs, prediction_loss_only=False, ignore_keys=ignore_keys, **gen_kwargs
        )
        if labels is None:
            return None, generated, None
        return loss, (generated, nll_sum, token_count), labels


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed negative log-likelihood and count of label tokens (positions with -100 are ignored)."""
    losses = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    return losses.sum(dim=1), (labels != -100).sum(dim=1)


def untie_separate_lm_head(model) -> bool:
    """Mark the config untied when the output embedding is its own tensor (mt0, mT5, flan-t5).

    transformers 5 loads these heads correctly but leaves `tie_word_embeddings: true`, so a later
    `tie_weights()` or `resize_token_embeddings()` (FSDP and ZeRO-3 set-up call them) would silently replace
    the head by the input embeddings. Passing `tie_word_embeddings=False` to `from_pretrained` instead would
    drop the shared encoder/decoder embeddings of safetensors checkpoints, so the flag is fixed after loading.
    """
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None or not getattr(model.config, "tie_word_embeddings", False):
        return False
    if output.weight is inputs.weight:
        return False
    model.config.tie_word_embeddings = False
    return True


def _longest_labels(dataset) -> int | None:
    if dataset is None or not hasattr(dataset, "column_names") or "labels" not in dataset.column_names:
        return None
    lengths = dataset.map(lambda batch: {"n": [len(x) for x in batch["labels"]]}, batched=True,
                          remove_columns=dataset.column_names, desc="Label lengths")["n"]
    return max(lengths, default=None)
