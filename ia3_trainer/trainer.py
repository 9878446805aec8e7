"""`IA3Seq2SeqTrainer`: a `Seq2SeqTrainer` that sets up IA3 itself and reports perplexity and label accuracy."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer
from transformers.modeling_outputs import BaseModelOutput

from .checkpoints import last_checkpoint, save_checkpoint_atomically
from .data import PreparedData, build_collator, encode_batch, prepare_data
from .errors import RecipeError
from .errors import first_line as _first_line
from .metrics import DEFAULT_METRICS, build_compute_metrics, needs_generation, perplexity
from .ranking import candidate_label_ids, score_candidates
from .recipe import DataSection, ModelSection, Recipe, load_recipe
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
        from .callbacks import PushAdapterToHubCallback

        if args.push_to_hub and any(isinstance(cb, PushAdapterToHubCallback) for cb in kwargs.get("callbacks") or []):
            # One rule: a PushAdapterToHubCallback owns pushing; Trainer's own push would upload the same folder
            # a second time, in competing commits.
            raise ValueError(
                "You passed push_to_hub=True together with a PushAdapterToHubCallback; set push_to_hub=False and "
                "let the callback push (recipes: use the hub section)"
            )
        model = self.wrap_model_with_ia3(model, peft_config)
        if args.bf16:
            cast_frozen_weights(model, torch.bfloat16)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or build_collator(processing_class, model, _pad_multiple(args)),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or build_compute_metrics(processing_class, candidate_labels),
            **kwargs,
        )
        if getattr(args, "non_finite_loss", "stop") == "skip" and self.is_deepspeed_enabled:
            raise RecipeError(
                "training.non_finite_loss: 'skip' does not work with DeepSpeed, which keeps gradients in its own "
                "buffers; use 'stop'"
            )
        # Trainer counts the label tokens of each optimizer step (num_items_in_batch) only for models that take loss
        # keyword arguments; compute_loss below always uses the count, whatever the model's forward accepts.
        self.model_accepts_loss_kwargs = True
        self.recipe = recipe
        self.candidate_labels = candidate_labels
        self.max_new_tokens = max_new_tokens or _longest_labels(eval_dataset)
        if self.is_world_process_zero():
            self.model.print_trainable_parameters()

    # --- construction ---------------------------------------------------------------------------------------------

    # Extra recipe sections this trainer reads, `{"name": dataclass}`: checked like the built-in sections (types,
    # unknown keys, the dataclass's own `__post_init__`) and available as `self.recipe.extra["name"]`.
    recipe_sections: dict[str, type] = {}

    @classmethod
    def from_recipe(cls, recipe: str | Path | dict | Recipe, overrides: dict | list[str] | None = None, **kwargs):
        """Build a ready trainer from a recipe name, file, dict or [`Recipe`], applying `overrides` first.

        The steps run in this order, each an overridable hook, so a subclass replaces one step and keeps the others:
        `load_tokenizer` → `load_datasets` (which maps `preprocess` over the examples) → `build_compute_metrics` →
        `load_model` → `build_ia3_config` → `build_callbacks`. Data is loaded and checked before the model, so a
        bad column or label fails before a large download. `kwargs` go to the constructor (`callbacks` are added
        after those of `build_callbacks`).
        """
        if not isinstance(recipe, Recipe) or overrides or not set(cls.recipe_sections) <= set(recipe.extra):
            raw = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
            recipe = load_recipe(raw, overrides, extra_sections=cls.recipe_sections)
        args = recipe.training_args()
        tokenizer = cls.load_tokenizer(recipe.model)
        # Under accelerate launch every process prepares the data; the main one fills the datasets cache first.
        with args.main_process_first(desc="preparing data"):
            prepared = cls.load_datasets(recipe, tokenizer)
        if recipe.data.label_names is None and prepared.label_names:
            # The label set read from the data (ClassLabel names, or a few distinct texts) goes into recipe.json, so
            # predict and evaluate later bound generation and rank by the same labels as training did.
            data = dataclasses.replace(recipe.data, label_names=prepared.label_names)
            recipe = dataclasses.replace(recipe, data=data)
        compute_metrics = cls.build_compute_metrics(recipe, tokenizer, prepared.label_names)
        model = cls.load_model(recipe.model, seed=args.seed)
        peft_config = cls.build_ia3_config(recipe, model)
        callbacks = [*cls.build_callbacks(recipe), *(kwargs.pop("callbacks", None) or [])]
        return cls(
            model,
            args,
            train_dataset=prepared.train_dataset,
            eval_dataset=prepared.eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            recipe=recipe,
            candidate_labels=prepared.label_names,
            max_new_tokens=prepared.max_label_tokens,
            compute_metrics=kwargs.pop("compute_metrics", None) or compute_metrics,
            callbacks=callbacks or None,
            **kwargs,
        )

    @classmethod
    def load_datasets(cls, recipe: Recipe, tokenizer) -> PreparedData:
        """Load, check and tokenize the recipe's data (`data.prepare_data`), mapping `preprocess` over batches.

        Override to add splits or filter examples; return a [`PreparedData`] (`train_dataset`, `eval_dataset`,
        `label_names`, `max_label_tokens`).
        """
        return prepare_data(recipe.data, tokenizer, encode=cls.preprocess)

    @classmethod
    def preprocess(cls, batch: dict, tokenizer, data: DataSection) -> dict:
        """Turn a batch of examples (`{column: [values]}`) into model inputs (`input_ids`, `attention_mask`, `labels`).

        The default prefixes `data.source_prefix` and truncates (`data.encode_batch`); override it for prompt
        templates. Only columns the model's `forward` accepts reach it (Trainer drops the others).
        """
        return encode_batch(batch, tokenizer, data)

    @classmethod
    def build_compute_metrics(cls, recipe: Recipe, tokenizer, candidate_labels: list[str] | None):
        """The `compute_metrics` of the recipe's `eval.metrics` (a missing metric package fails here, before the
        model loads)."""
        return build_compute_metrics(tokenizer, candidate_labels, metrics=recipe.eval.metrics)

    @classmethod
    def build_ia3_config(cls, recipe: Recipe, model: PreTrainedModel):
        """The `peft.IA3Config` of the `ia3` section; gets the loaded base model to pick modules per architecture."""
        return recipe.ia3_config()

    @classmethod
    def build_callbacks(cls, recipe: Recipe) -> list:
        """Callbacks the recipe asks for: a [`PushAdapterToHubCallback`] when `hub.repo_id` is set."""
        if recipe.hub.repo_id is None:
            return []
        from .callbacks import PushAdapterToHubCallback

        return [PushAdapterToHubCallback(recipe.hub.repo_id, private=recipe.hub.private, strategy=recipe.hub.strategy)]

    @staticmethod
    def load_tokenizer(model: ModelSection):
        """Load the tokenizer named by the `model` section."""
        from transformers import AutoTokenizer

        name = model.tokenizer_name_or_path or model.name_or_path
        try:
            return AutoTokenizer.from_pretrained(
                name, revision=model.revision, trust_remote_code=model.trust_remote_code
            )
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
                raise RecipeError(
                    f"ia3.target_modules: peft has no IA3 default for model type {model.config.model_type!r}; set "
                    "ia3.target_modules and ia3.feedforward_modules (e.g. [\"k_proj\", \"v_proj\", \"fc2\"] and "
                    "[\"fc2\"])"
                ) from error
            raise

    # --- training and logging -------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Train; then, when `args.save_final_adapter`, save the adapter, tokenizer and recipe to `output_dir`.

        `resume_from_checkpoint=True` resumes from the newest whole `checkpoint-N` in `output_dir` (checkpoints are
        written atomically, and a folder a crash left half-written is skipped); a path resumes from that folder.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise RecipeError(
                    f"training.output_dir: no checkpoint to resume from in {self.args.output_dir}; train without "
                    "--resume to start over, or set training.save_strategy so that runs save checkpoints"
                )
            logger.info("Resuming from %s", resume_from_checkpoint)
        if self.recipe is not None and self.args.should_save:
            # Written first, so a crashed run and every pushed checkpoint still say how they were made.
            self.recipe.save(self.args.output_dir)
        from .callbacks import PushAdapterToHubCallback

        save_final = getattr(self.args, "save_final_adapter", False)
        pushers = [cb for cb in self.callback_handler.callbacks if isinstance(cb, PushAdapterToHubCallback)]
        for pusher in pushers:  # push the folder saved below, by every process, not one the callback saves alone
            pusher.defer_final_push = save_final
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if save_final:
            self.save_model()
            for pusher in pushers:
                pusher.push_final(self.args.output_dir, self.args, self.state)
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Perplexity next to every training loss; the eval loop adds eval_perplexity from exact token counts.
        # The dict is updated in place because train() returns the same dict it logs.
        for loss_key, key in (("loss", "perplexity"), ("train_loss", "train_perplexity")):
            if loss_key in logs and key not in logs:
                logs[key] = perplexity(logs[loss_key])
        super().log(logs, start_time)

    # compute_loss divides by the label tokens of the whole optimizer step (every micro-batch, every process), so
    # Trainer must neither divide it by the accumulation steps again nor rescale it by the process count.
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy summed over label tokens, divided by `num_items_in_batch`: the label tokens of the whole
        optimizer step, over every micro-batch and (with `average_tokens_across_devices`, the default) every process.

        The T5 family returns a per-batch mean and ignores `num_items_in_batch`, which Trainer then multiplies by the
        process count: under DDP the logged loss and the gradients were scaled by the number of processes. Computed
        here, one process with batch 16, two with batch 8 and one with batch 8 and two accumulation steps give the
        same loss and the same update. DDP averages gradients over processes, hence the factor below. Evaluation
        loss is not computed here (see `prediction_step`).
        """
        labels = inputs["labels"]
        unwrapped = self.accelerator.unwrap_model(model)
        features = {key: value for key, value in inputs.items() if key != "labels"}
        if "decoder_input_ids" not in features and hasattr(unwrapped, "prepare_decoder_input_ids_from_labels"):
            # The model computes no loss of its own (a mean we would discard) when it gets no labels.
            features["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
        else:
            features["labels"] = labels
        outputs = model(**features)
        nll = torch.nn.functional.cross_entropy(
            outputs.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        if num_items_in_batch is None:  # called outside the training loop (e.g. by a subclass or a test)
            num_items_in_batch = (labels != -100).sum()
        loss = nll / num_items_in_batch
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # A nan/inf loss would reach the IA3 vectors at the next optimizer step and every checkpoint after it, so it
        # is caught here, before that step. Each process checks every process's loss (a DDP all-reduce has already
        # spread one process's nan gradients to all), so they all stop, or all skip, together.
        skip = getattr(self.args, "non_finite_loss", "stop") == "skip"
        params = [p for p in model.parameters() if p.requires_grad] if skip else []
        grads = [(p, None if p.grad is None else p.grad.clone()) for p in params]  # the IA3 vectors: a few KB
        loss = super().training_step(model, inputs, num_items_in_batch)
        losses = self.accelerator.gather(loss.detach().float().reshape(1))
        if torch.isfinite(losses).all():
            return loss
        value, step = losses[~torch.isfinite(losses)][0].item(), self.state.global_step + 1
        if not skip:
            checkpoint = last_checkpoint(self.args.output_dir) or "none (no checkpoint was saved yet)"
            raise RecipeError(
                f"training.non_finite_loss: loss is {value} at step {step}; lower training.learning_rate, set "
                "training.max_grad_norm or check the data (or set training.non_finite_loss to 'skip'); the last "
                f"checkpoint is {checkpoint}"
            )
        for param, grad in grads:  # as if this batch had never been seen
            param.grad = grad
        if self.is_world_process_zero():
            logger.warning("training.non_finite_loss: loss is %s at step %d; skipped this batch", value, step)
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (never the base weights), the tokenizer and `recipe.json` to `output_dir`.

        A base model built with `model.init: random` cannot be downloaded again, so the final save also keeps
        it in `output_dir/base-model` and points the adapter at it, so `AutoPeftModelForSeq2SeqLM` can load it.
        """
        output_dir = output_dir or self.args.output_dir
        if not _internal_call and self.recipe is not None and self.recipe.model.init == "random":
            base_dir = Path(output_dir) / "base-model"
            if self.args.should_save:
                # IA3 wraps each target as `k.base_layer` + `k.ia3_l`; saved as they are, those keys would not load
                # into a plain model (its k/v/wo would come back random), so save the plain names without IA3.
                base = self.model.get_base_model()
                state = {key.replace(".base_layer.", "."): value for key, value in base.state_dict().items()
                         if ".ia3_l." not in key}
                base.save_pretrained(base_dir, state_dict=state)
                self.processing_class.save_pretrained(base_dir)
            self.model.peft_config[self.model.active_adapter].base_model_name_or_path = str(base_dir.resolve())
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.recipe is not None:
            self.recipe.save(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        # transformers 5.24 writes checkpoint-N in place, so a crash mid-save leaves a folder that resuming takes
        # for whole; write it to tmp-checkpoint-N and rename it when every process is done (checkpoints.py).
        save_checkpoint_atomically(self, trial, lambda: super(IA3Seq2SeqTrainer, self)._save_checkpoint(model, trial))

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, Trainer's run folder is its staging folder (see _save_checkpoint).
        return getattr(self, "_checkpoint_staging_root", None) or super()._get_output_dir(trial)

    # --- evaluation -----------------------------------------------------------------------------------------------

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # Seq2SeqTrainer.evaluate switches to accelerator.gather, which keeps the copies that even batches add to
        # the last batch under DDP; metrics must count each example once, so gather for metrics instead.
        self.gather_function = self.accelerator.gather_for_metrics
        self._eval_runtimes = {"generate": 0.0, "rank": 0.0}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if not (prediction_loss_only or self.args.prediction_loss_only):
            for name, seconds in self._eval_runtimes.items():
                if seconds:
                    output.metrics[f"{metric_key_prefix}_{name}_runtime"] = round(seconds, 4)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """One forward pass for the token losses; rank classification and a bounded `generate` reuse its encoding.

        Returns `(loss, predictions, labels)` where `predictions` is a dict of per-example tensors (`generated`,
        `nll_sum`, `token_count`, and `rank_choice` when the label set is known) instead of logits, so perplexity
        is exact over the whole eval set and memory does not grow with the vocabulary.
        """
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        loss, predictions, encoded = None, {}, None
        with torch.no_grad(), self.compute_loss_context_manager():
            if labels is not None:
                # One call of the whole model, so FSDP's and autocast's hooks on it run, gives the token losses and
                # the encoder output that ranking and generation reuse.
                outputs = model(**inputs)
                predictions["nll_sum"], predictions["token_count"] = token_nll(outputs.logits, labels)
                loss = predictions["nll_sum"].sum() / predictions["token_count"].sum().clamp(min=1)
                # accelerate's mixed precision returns outputs in fp32; generation runs outside autocast, in the
                # dtype of the (possibly bf16) frozen weights, so the reused encoding goes back to that dtype.
                hidden = outputs.encoder_last_hidden_state.to(self.model.get_input_embeddings().weight.dtype)
                encoded = BaseModelOutput(last_hidden_state=hidden)
            if prediction_loss_only:
                return loss, None, None
            if encoded is not None and self._candidate_ids is not None and "rank_accuracy" in self.eval_metrics:
                started = time.perf_counter()
                scores = score_candidates(model, encoded, inputs["attention_mask"], self._candidate_ids)
                predictions["rank_choice"] = scores.argmax(dim=-1)
                self._eval_runtimes["rank"] += time.perf_counter() - started

        if labels is not None and not needs_generation(self.eval_metrics):  # e.g. perplexity and rank accuracy
            return loss, predictions, labels
        gen_kwargs = {**getattr(self, "_gen_kwargs", {}), **gen_kwargs}
        if gen_kwargs.get("max_length") is None and gen_kwargs.get("max_new_tokens") is None and self.max_new_tokens:
            # As max_length (decoder start + label tokens), so it replaces the model's default of 20, not races it.
            gen_kwargs["max_length"] = self.max_new_tokens + 1
        started = time.perf_counter()
        source = {"encoder_outputs": encoded} if encoded is not None else {"input_ids": inputs["input_ids"]}
        _, predictions["generated"], _ = super().prediction_step(
            model, {"attention_mask": inputs["attention_mask"], **source},
            prediction_loss_only=False, ignore_keys=ignore_keys, **gen_kwargs,
        )
        self._eval_runtimes["generate"] += time.perf_counter() - started
        if labels is None:
            return None, predictions["generated"], None
        return loss, predictions, labels

    def final_eval_metrics(self) -> dict[str, float]:
        """The eval metrics of the trained adapter: the evaluation the run made at its last step when there was one
        (eval_strategy epoch or steps) and the model is still that one, else a new evaluation."""
        last = next((entry for entry in reversed(self.state.log_history) if "eval_loss" in entry), None)
        if last is not None and last.get("step") == self.state.global_step and not self.args.load_best_model_at_end:
            return {key: value for key, value in last.items() if key.startswith("eval_")}
        return self.evaluate()

    @property
    def eval_metrics(self) -> list[str]:
        """The metric names evaluation computes: the recipe's `eval.metrics`, else the defaults. `prediction_step`
        skips generation and ranking that no listed metric needs; a subclass that adds metrics in
        `build_compute_metrics` overrides this too."""
        return list(self.recipe.eval.metrics) if self.recipe is not None else list(DEFAULT_METRICS)

    @property
    def _candidate_ids(self):
        """Candidate label ids for rank classification, or None when the label set is unknown or ranking is off."""
        if not self.candidate_labels or not getattr(self.args, "rank_classification", True):
            return None
        if getattr(self, "_candidate_ids_cache", None) is None:
            self._candidate_ids_cache = candidate_label_ids(self.processing_class, self.candidate_labels)
        return self._candidate_ids_cache


def cast_frozen_weights(model, dtype: torch.dtype) -> None:
    """Store the frozen base weights in `dtype`; the trainable IA3 vectors stay fp32.

    With bf16 on, autocast alone would recompute a bf16 copy of every frozen weight at each step and keep it for
    the backward pass: faster than fp32, but more memory. Frozen weights never receive updates, so storing them in
    bf16 loses nothing to rounding over time, halves their memory and skips the casts (benchmarks/throughput.py).
    peft's IA3 layers multiply in the vectors' fp32 and cast back to the activations' dtype.
    """
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _pad_multiple(args) -> int | None:
    """Pad to a multiple of 8 on GPU (tensor cores) and under bf16 (CPU: bounds the shapes oneDNN caches kernels
    for); fp32 on CPU pads to the longest sequence only, as a multiple adds work there (benchmarks/throughput.py)."""
    return 8 if args.device.type == "cuda" or args.bf16 else None


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
