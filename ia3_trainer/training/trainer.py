"""`IA3Seq2SeqTrainer`: a `Seq2SeqTrainer` that sets up IA3 itself and reports perplexity and label accuracy."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer

from ia3_trainer.data.encoding import build_collator, encode_batch
from ia3_trainer.data.preparation import PreparedData, prepare_data
from ia3_trainer.errors import RecipeError
from ia3_trainer.evaluation.loop import Evaluation, EvaluationMixin, no_extra_metrics
from ia3_trainer.evaluation.metrics import DEFAULT_METRICS, check_metrics, perplexity
from ia3_trainer.modeling import kernels, layers
from ia3_trainer.modeling import loading as modeling
from ia3_trainer.modeling.scoring import teacher_forced_inputs, token_nll
from ia3_trainer.modeling.threads import cpu_threads
from ia3_trainer.recipe.loading import DataSection, Recipe, load_recipe
from ia3_trainer.recipe.training_args import IA3TrainingArguments, pad_multiple
from ia3_trainer.training import lifecycle
from ia3_trainer.training.checkpoints import AtomicCheckpoints, last_checkpoint
from ia3_trainer.training.guard import GuardSteps, NonFiniteGuard
from ia3_trainer.training.resuming import check_finished
from ia3_trainer.training.saving import SavingMixin


logger = logging.getLogger(__name__)


class IA3Seq2SeqTrainer(EvaluationMixin, SavingMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] that trains an IA3 adapter on a seq2seq model.

    It wraps a plain model with `peft.get_peft_model` (or takes a ready IA3 `PeftModel`), pads batches
    dynamically, and evaluates by generating each label: `evaluate()` reports `eval_loss` (the mean token loss over
    the whole eval set), `eval_perplexity` (its exp), `eval_label_accuracy` (generated text equals the gold label
    text) and `eval_rank_accuracy` (the most likely label of the known label set). `save_model()` writes the adapter
    only, the tokenizer, `recipe.json` and `inference.json`.

    Args:
        model ([`~transformers.PreTrainedModel`] or `peft.PeftModel`):
            Base seq2seq model to wrap, or a `PeftModel` that already has an IA3 adapter.
        args ([`IA3TrainingArguments`], *optional*):
            Training arguments; a plain [`~transformers.Seq2SeqTrainingArguments`] works too.
        peft_config (`peft.IA3Config`, *optional*):
            IA3 settings for a plain model; defaults to the architecture's IA3 targets.
        recipe ([`Recipe`], *optional*):
            The recipe this trainer was built from; saved as `recipe.json` with the adapter.
        candidate_labels (`list[str]`, *optional*):
            Label texts of a classification task: rank classification scores them, and `inference.json` keeps them.
        max_new_tokens (`int`, *optional*):
            Generation bound in evaluation; defaults to the longest label of the dataset being evaluated.
        metrics (`list[str]`, *optional*):
            Built-in metrics evaluation reports (names of `ia3_trainer.evaluation.metrics.METRICS`); defaults to the
            recipe's `eval.metrics`, else perplexity, label accuracy and rank accuracy.
        compute_metrics (`Callable`, *optional*):
            A Trainer `compute_metrics`: it receives `EvalPrediction(predictions=generated token ids,
            label_ids=labels)` (ids padded with -100) and its results are added to the built-in metrics.
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
    # compute_loss divides by the label tokens of the whole optimizer step (every micro-batch, every process), so
    # Trainer must neither divide it by the accumulation steps again nor rescale it by the process count.
    loss_is_scaled_for_ga = True

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
        metrics: list[str] | None = None,
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
        if getattr(args, "batch_eval_metrics", False):
            raise RecipeError(key="training.batch_eval_metrics",
                              problem="IA3Seq2SeqTrainer computes metrics over the whole eval set", fix="set it false")
        if not args.predict_with_generate:
            # Evaluation always generates: label accuracy needs free-running output, and not keeping full-vocab
            # logits for the whole eval set is what keeps evaluation memory flat.
            logger.info("IA3Seq2SeqTrainer evaluates by generation; setting predict_with_generate=True")
            args.predict_with_generate = True
        from ia3_trainer.hub.callback import PushAdapterToHubCallback

        if args.push_to_hub and any(isinstance(cb, PushAdapterToHubCallback) for cb in kwargs.get("callbacks") or []):
            # One rule: a PushAdapterToHubCallback owns pushing; Trainer's own push would upload the same folder
            # a second time, in competing commits.
            raise RecipeError(
                key="training.push_to_hub", problem="is true together with a PushAdapterToHubCallback",
                fix="set it false and let the callback push (recipes: use the hub section)",
            )
        model = self.wrap_model_with_ia3(model, peft_config)
        # IA3 layers that scale in the activations' dtype: no activation-size casts under bf16, one op fewer a layer.
        layers.install(model)
        if args.bf16:
            modeling.cast_frozen_weights(model, torch.bfloat16)
        if getattr(args, "fused_kernels", False):
            kernels.fuse_modules(model)
        self.atomic_checkpoints = AtomicCheckpoints()  # Trainer asks _get_output_dir during __init__ already
        made = args is not None and not Path(args.output_dir).exists()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or build_collator(processing_class, model, pad_multiple(args)),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            # Never None: Trainer.evaluate gathers no predictions without compute_metrics; our metrics need them.
            compute_metrics=compute_metrics or no_extra_metrics,
            **kwargs,
        )
        if made:  # Trainer made output_dir; the run's claim makes it (and removes it when the run cannot start)
            with contextlib.suppress(OSError):
                Path(args.output_dir).rmdir()
        if getattr(args, "non_finite_loss", "stop") == "skip" and self.is_deepspeed_enabled:
            raise RecipeError(
                key="training.non_finite_loss",
                problem="'skip' does not work with DeepSpeed, which keeps gradients in its own buffers",
                fix="use 'stop'",
            )
        self.non_finite_guard = NonFiniteGuard(
            getattr(args, "non_finite_loss", "stop"), step=lambda: self.state.global_step + 1,
            last_checkpoint=lambda: last_checkpoint(self.args.output_dir),
        )
        self.compiled_blocks = kernels.compile_blocks(self.model) if getattr(args, "compile_blocks", False) else None
        # Trainer counts the label tokens of each optimizer step (num_items_in_batch) only for models that take loss
        # keyword arguments; compute_loss below always uses the count, whatever the model's forward accepts.
        self.model_accepts_loss_kwargs = True
        self.recipe = recipe
        self.candidate_labels = list(candidate_labels) if candidate_labels else None
        self.max_new_tokens = max_new_tokens
        self.metrics = list(metrics or (recipe.eval.metrics if recipe is not None else DEFAULT_METRICS))
        check_metrics(self.metrics)
        self.last_evaluation: Evaluation | None = None
        self.callback_handler.callbacks.insert(0, GuardSteps(self.non_finite_guard))  # before any logging callback
        if self.is_world_process_zero():
            self.model.print_trainable_parameters()

    # --- construction ---------------------------------------------------------------------------------------------

    # Extra recipe sections this trainer reads, `{"name": dataclass}`: checked like the built-in sections (types,
    # unknown keys, the dataclass's own `__post_init__`) and available as `self.recipe.extra["name"]`.
    recipe_sections: dict[str, type] = {}

    @classmethod
    def from_recipe(cls, recipe: str | Path | dict | Recipe, overrides: dict | list[str] | None = None, **kwargs):
        """Build a ready trainer from a recipe name, file, dict or [`Recipe`], applying `overrides` first.

        The steps run in this order, each an overridable classmethod hook, so a subclass replaces one step and keeps
        the others: `load_tokenizer` → `load_datasets` (which maps `preprocess` over the examples) →
        `build_compute_metrics` → `load_model` → `build_ia3_config` → `build_callbacks`. Data is loaded and checked
        before the model, so a bad column or label fails before a large download. `kwargs` go to the constructor
        (`callbacks` are added after those of `build_callbacks`).
        """
        if not isinstance(recipe, Recipe) or overrides or not set(cls.recipe_sections) <= set(recipe.extra):
            raw = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
            recipe = load_recipe(raw, overrides, extra_sections=cls.recipe_sections)
        args = recipe.training_args()
        tokenizer = cls.load_tokenizer(recipe)
        # Under accelerate launch every process prepares the data; the main one fills the datasets cache first.
        with args.main_process_first(desc="preparing data"):
            prepared = cls.load_datasets(recipe, tokenizer)
        compute_metrics = cls.build_compute_metrics(recipe, tokenizer, prepared.label_names)
        model = cls.load_model(recipe, seed=args.seed)
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
            # Free text: each evaluated dataset bounds generation by its own longest target.
            max_new_tokens=prepared.max_label_tokens if prepared.label_names else None,
            compute_metrics=kwargs.pop("compute_metrics", None) or compute_metrics,
            callbacks=callbacks or None,
            **kwargs,
        )

    @classmethod
    def load_datasets(cls, recipe: Recipe, tokenizer) -> PreparedData:
        """Load, check and tokenize the recipe's data (`data.preparation.prepare_data`), mapping `preprocess` over
        batches.

        Override to add splits or filter examples; return a [`PreparedData`] (`train_dataset`, `eval_dataset`,
        `label_names`, `max_label_tokens`).
        """
        return prepare_data(recipe.data, tokenizer, encode=cls.preprocess)

    @classmethod
    def preprocess(cls, batch: dict, tokenizer, data: DataSection) -> dict:
        """Turn a batch of examples (`{column: [values]}`) into model inputs (`input_ids`, `attention_mask`, `labels`).

        The default prefixes `data.source_prefix` and truncates (`data.encode_batch`); override it for prompt
        templates. Only columns the model's `forward` accepts reach it (Trainer drops the others). Inference
        (`IA3Predictor`) must encode the same way: an adapter trained with an overridden `preprocess` records it in
        `inference.json`, and `IA3Predictor.from_pretrained(..., encode=YourTrainer.preprocess)` uses it.
        """
        return encode_batch(batch, tokenizer, data)

    @classmethod
    def build_compute_metrics(cls, recipe: Recipe, tokenizer, candidate_labels: list[str] | None):
        """A Trainer `compute_metrics` whose results are added to the recipe's `eval.metrics`, or None (the default).

        It receives `EvalPrediction(predictions=generated token ids, label_ids=labels)`, ids padded with -100; e.g.
        `ia3_trainer.evaluation.metrics.on_decoded(tokenizer, evaluate_metric("meteor"))`. The default checks that the
        packages of the recipe's text metrics are installed, so a missing one fails here, before the model loads.
        """
        check_metrics(recipe.eval.metrics)
        return None

    @classmethod
    def build_ia3_config(cls, recipe: Recipe, model: PreTrainedModel):
        """The `peft.IA3Config` of the `ia3` section; modules left null come from the model's family
        (`architectures.build_ia3_config`)."""
        from ia3_trainer.modeling.architectures import build_ia3_config

        try:
            return build_ia3_config(model, recipe.ia3)
        except ValueError as error:  # a family without defaults: the recipe must name the modules
            raise RecipeError(str(error)) from error

    @classmethod
    def build_callbacks(cls, recipe: Recipe) -> list:
        """Callbacks the recipe asks for: a [`PushAdapterToHubCallback`] when `hub.repo_id` is set."""
        if recipe.hub.repo_id is None:
            return []
        from ia3_trainer.hub.callback import PushAdapterToHubCallback

        # The run saves the final adapter (every process) and then has the callback push it (`lifecycle.run`).
        return [PushAdapterToHubCallback(recipe.hub.repo_id, private=recipe.hub.private, strategy=recipe.hub.strategy,
                                         save_final=False)]

    @classmethod
    def load_tokenizer(cls, recipe: Recipe):
        """Load the tokenizer the recipe's `model` section names (`ia3_trainer.modeling.loading.load_tokenizer`)."""
        return modeling.load_tokenizer(recipe.model)

    @classmethod
    def load_model(cls, recipe: Recipe, seed: int = 42) -> PreTrainedModel:
        """Load (or, with `init: random`, build from its config and `seed`) the base model the recipe's `model`
        section names, with the untied-head guard (`ia3_trainer.modeling.loading.load_model`)."""
        return modeling.load_model(recipe.model, seed=seed)

    @classmethod
    def wrap_model_with_ia3(cls, model, peft_config=None):
        """Return `model` wrapped with IA3, or the given IA3 `PeftModel` as it is (`modeling.wrap_with_ia3`: without
        `peft_config`, or with one whose `target_modules` is None, the modules come from the model's family)."""
        return modeling.wrap_with_ia3(model, peft_config)

    # --- training and logging -------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, *,
              on_results=None) -> lifecycle.RunOutput:
        """Run training as a whole (`ia3_trainer.training.lifecycle.run`) and return a [`~lifecycle.RunOutput`],
        Trainer's `TrainOutput` with the run's results.

        Every trainer claims `output_dir` for the run (`ia3_trainer.training.runs`): a fresh run needs a new or empty
        folder, or `args.overwrite_output_dir` to replace another run's files; a second run on the folder at the same
        time is refused. `resume_from_checkpoint=True` resumes from the newest whole `checkpoint-N` in `output_dir`
        (checkpoints are written atomically, and a folder a crash left half-written or a disk damaged is skipped); a
        path resumes from that folder. Resuming continues the recorded run only when the recipe differs in keys that
        do not change what is trained (`ia3_trainer.training.resuming.RESUMABLE`). Then, with
        `args.save_final_adapter`, the adapter, tokenizer, `recipe.json`, `inference.json` and the card are saved to
        `output_dir` (every process takes part) and a [`PushAdapterToHubCallback`] made with `save_final=False` pushes
        them.

        What else it writes depends on how the trainer was made:

        - Built from a recipe (`from_recipe`, or given `recipe=`): exactly what `ia3-trainer train` writes. Without
          `resume_from_checkpoint`, the recipe's `training.resume_from_checkpoint` applies. After the final save come
          the last evaluation (the one at the last step when there was one), `trainer_state.json`, `all_results.json`
          (train and last `eval_*` metrics, also in the returned `metrics`), `eval_report.json` with its PNG plots,
          and the card with the final metrics; `on_results(output)` is then called on the main process, and the run
          waits, bounded and saying so, for the Hub pushes.
        - Built by hand (`IA3Seq2SeqTrainer(model, args, ...)`): Trainer's contract. Checkpoints as `save_strategy`
          says and the final adapter above; no results, report or wait (call `evaluate`, `save_metrics`,
          `save_state` and `PushAdapterToHubCallback.wait` as with any Trainer).
        """
        def train_steps(resume):
            output = super(IA3Seq2SeqTrainer, self).train(resume, trial, ignore_keys_for_eval)
            if getattr(self, "_trained_out", False):  # nothing trained in this call: Trainer's train_loss would read 0
                for key in ("train_loss", "train_perplexity"):
                    output.metrics.pop(key, None)
            return output

        with cpu_threads(self.model, self.args.device):  # one thread for a small model on the CPU, the whole run
            return lifecycle.run(self, train_steps, resume_from_checkpoint, on_results=on_results)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        # Trainer takes the logging, eval and save steps of a resumed run from the checkpoint's trainer_state.json;
        # the recipe may change them on resume (resuming.RESUMABLE), so they apply from the checkpoint on.
        trained = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                               resume_from_checkpoint, trial)
        self.state.compute_steps(self.args, max_steps)
        self._trained_out = resume_from_checkpoint is not None and self.state.global_step >= max_steps
        if self._trained_out:
            check_finished(resume_from_checkpoint, self.state.global_step, max_steps, self.is_world_process_zero(),
                           by_epochs=self.args.max_steps <= 0)
            # transformers 5.24 would run the rest of the checkpoint's epoch and train one step past max_steps (a
            # kill during the final save leaves the checkpoint of the last step): no epoch is left to run.
            return num_train_epochs, 0
        return trained

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The host already waited for these numbers: the moment to read the non-finite guard's flags (it raises for
        # non_finite_loss "stop") and leave skipped steps out of the logged means.
        self.non_finite_guard.check()
        self.non_finite_guard.correct(logs)
        # Perplexity next to every training loss that is the token NLL (not a smoothed or a user's loss); the eval
        # loop adds eval_perplexity from exact token counts. The dict is updated in place because train() returns the
        # same dict it logs.
        nll = not self.args.label_smoothing_factor and self.compute_loss_func is None
        for loss_key, key in (("loss", "perplexity"), ("train_loss", "train_perplexity")):
            if nll and loss_key in logs and key not in logs:
                logs[key] = perplexity(logs[loss_key])
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy summed over label tokens, divided by `num_items_in_batch`: the label tokens of the whole
        optimizer step, over every micro-batch and (with `average_tokens_across_devices`, the default) every process.

        The T5 family returns a per-batch mean and ignores `num_items_in_batch`, which Trainer then multiplies by the
        process count: under DDP the logged loss and the gradients were scaled by the number of processes. Computed
        here, one process with batch 16, two with batch 8 and one with batch 8 and two accumulation steps give the
        same loss and the same update. DDP averages gradients over processes, hence the factor below. Evaluation
        loss is not computed here (see `prediction_step`).

        With `label_smoothing_factor` ε each token counts `(1 - ε) * nll + ε * mean over the vocabulary of -log p`
        (transformers' `LabelSmoother`), with the same normalisation. A `compute_loss_func` given to the constructor
        replaces the cross-entropy: it gets `(outputs, labels, num_items_in_batch=...)`, as Trainer calls it, and must
        normalise by `num_items_in_batch` when that is given.
        """
        labels = inputs["labels"]
        # The whole (possibly DDP/FSDP-wrapped) model is called, on inputs built from the unwrapped one.
        outputs = model(**teacher_forced_inputs(self.accelerator.unwrap_model(model), inputs))
        if self.compute_loss_func is not None:  # Trainer's contract: normalised by num_items_in_batch, if given
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            nll, tokens = token_nll(outputs.logits, labels, label_smoothing=self.args.label_smoothing_factor)
            # Called outside the training loop (e.g. by a subclass): this batch's mean.
            loss = nll.sum() / (tokens.sum() if num_items_in_batch is None else num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # the count is global (Trainer gathers it)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # No host read here: the non-finite guard decides on the device before each optimizer step (guard.py).
        self.non_finite_guard.attach(self.optimizer)
        step = super().training_step
        if self.compiled_blocks is None:
            return self.non_finite_guard.observe(step(model, inputs, num_items_in_batch))
        kernels.mark_step_begin()
        loss = self.compiled_blocks.run_step(lambda: step(model, inputs, num_items_in_batch))
        return self.non_finite_guard.observe(loss)

    def inference_settings(self) -> dict:
        """What `inference.json` holds: the label set, the generation bound, and how sources were encoded
        (`default`, `custom:<qualified name of preprocess>`, or null when the trainer did not encode them)."""
        preprocess = type(self).preprocess.__func__
        if self.recipe is None:
            encode = None
        elif preprocess is IA3Seq2SeqTrainer.preprocess.__func__:
            encode = "default"
        else:
            encode = f"custom:{preprocess.__module__}.{preprocess.__qualname__}"
        return {"label_names": self.candidate_labels, "max_new_tokens": self.generation_bound(), "encode": encode}
