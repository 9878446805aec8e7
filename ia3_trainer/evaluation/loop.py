"""Evaluation for [`IA3Seq2SeqTrainer`]: Trainer's evaluation loop on top of the one evaluation kernel
(`ia3_trainer.modeling.scoring.score_batch`), built-in metrics from per-example outputs, and the record of the last
evaluation that reports are built from (so `ia3-trainer train` never evaluates twice at the same step)."""

from __future__ import annotations

import contextlib

import torch
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

from ia3_trainer.data.labels import longest_labels
from ia3_trainer.evaluation.metrics import eval_metrics, needs_generation
from ia3_trainer.modeling.scoring import EvalOutputs, candidate_label_ids, score_batch
from ia3_trainer.modeling.threads import cpu_threads


class EvaluationMixin:
    """The evaluation methods of [`IA3Seq2SeqTrainer`] (a `Seq2SeqTrainer`); they read `metrics`,
    `candidate_labels`, `max_new_tokens`, `recipe` and `non_finite_guard` from the trainer."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """Evaluate (see the class docstring for the metrics); the per-example outputs of this pass are kept in
        `self.last_evaluation` for reports."""
        self.non_finite_guard.check()
        with cpu_threads(self.model, self.args.device):
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
        self.last_evaluation = Evaluation(
            step=self.state.global_step, default_dataset=eval_dataset is None, metrics=dict(metrics),
            outputs=self._eval_outputs, after_training=not self.is_in_train,
        )
        return metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        """Predict on `test_dataset`: `predictions` are always generated token ids (also when no metric needs
        generation), with the metrics of `evaluate` when the dataset has labels."""
        self.non_finite_guard.check()
        self._predicting = True
        try:
            with cpu_threads(self.model, self.args.device):
                return super().predict(test_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
        finally:
            self._predicting = False

    def final_evaluation(self) -> Evaluation:
        """The evaluation of the trained adapter on `eval_dataset`: the one the run made at its last step when there
        was one and the model is still that one, else a new one. `ia3-trainer train` reports and writes it without
        evaluating twice."""
        last = self.last_evaluation
        # With load_best_model_at_end the model changed after the evaluations made while training.
        best_loaded = self.args.load_best_model_at_end and self.state.best_global_step != self.state.global_step
        if (last is None or not last.default_dataset or last.step != self.state.global_step
                or (best_loaded and not last.after_training)):
            self.evaluate()
        return self.last_evaluation

    def final_eval_metrics(self) -> dict[str, float]:
        """The `eval_*` metrics of [`final_evaluation`]."""
        return self.final_evaluation().eval_results()

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # Seq2SeqTrainer.evaluate switches to accelerator.gather, which keeps the copies that even batches add to
        # the last batch under DDP; metrics must count each example once, so gather for metrics instead.
        self.gather_function = self.accelerator.gather_for_metrics
        self._eval_runtimes = {"generate": 0.0, "rank": 0.0}
        self._eval_bound = self.generation_bound(dataloader.dataset)
        # The built-in metrics come from per-example outputs that Trainer's compute_metrics call never sees; the
        # user's compute_metrics is called below, with generated ids (prediction_step generates for it).
        user_metrics, self.compute_metrics = self.compute_metrics, None
        self._user_metrics = user_metrics if user_metrics is not no_extra_metrics else None
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            self.compute_metrics, self._user_metrics = user_metrics, None
        parts = output.predictions if isinstance(output.predictions, dict) else {}
        outputs = EvalOutputs(labels=output.label_ids, **parts)
        self._eval_outputs = outputs
        metrics = dict(output.metrics)
        if outputs.nll_sum is not None:  # the exact token mean, not Trainer's mean of batch means
            metrics[f"{metric_key_prefix}_loss"] = outputs.loss
        found = eval_metrics(outputs, self.metrics, self.processing_class, self.candidate_labels)
        if user_metrics not in (None, no_extra_metrics) and outputs.generated is not None:
            found.update(user_metrics(EvalPrediction(predictions=outputs.generated, label_ids=outputs.labels)))
        for name, seconds in self._eval_runtimes.items():
            if seconds:
                found[f"{name}_runtime"] = round(seconds, 4)
        metrics.update({f"{metric_key_prefix}_{key}": value for key, value in found.items()})
        return EvalLoopOutput(predictions=outputs.generated, label_ids=output.label_ids, metrics=metrics,
                              num_samples=output.num_samples)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """One [`ia3_trainer.modeling.scoring.score_batch`]: a forward pass for the token losses, whose encoder output
        rank classification and a bounded `generate` reuse.

        Returns `(loss, predictions, labels)` where `predictions` is a dict of per-example tensors (`nll_sum`,
        `token_count`, `teacher_forced`, `rank_choice`, `generated`) instead of logits, so perplexity is exact over
        the whole eval set and memory does not grow with the vocabulary. `evaluation_loop` turns them into
        `EvalOutputs`, metrics, and generated ids as the `predictions` users see.
        """
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        rank = labels is not None and "rank_accuracy" in self.metrics
        scores = score_batch(
            model, inputs,
            candidate_ids=self._candidate_ids if rank and not prediction_loss_only else None,
            generate=not prediction_loss_only and (
                labels is None or getattr(self, "_predicting", False) or needs_generation(self.metrics)
                or getattr(self, "_user_metrics", None) is not None),
            generate_fn=self._generate, sharded=self._sharded(), **self._generation_kwargs(gen_kwargs),
        )
        for name, seconds in scores.seconds.items():
            self._eval_runtimes[name] += seconds
        loss = scores.nll_sum.sum() / scores.token_count.sum().clamp(min=1) if labels is not None else None
        if prediction_loss_only:
            return loss, None, None
        return loss, scores.as_dict(), labels

    def _generation_kwargs(self, gen_kwargs: dict) -> dict:
        kwargs = {**getattr(self, "_gen_kwargs", {}), **gen_kwargs}
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        if "max_length" not in kwargs and "max_new_tokens" not in kwargs and self._eval_bound:
            kwargs["max_new_tokens"] = self._eval_bound
        return kwargs

    def _sharded(self) -> bool:
        """Whether the weights are gathered module by module across processes (FSDP, ZeRO-3): every process must
        then run the same decoder passes."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        from transformers.integrations.fsdp import is_fsdp_managed_module

        return is_deepspeed_zero3_enabled() or is_fsdp_managed_module(self.model)

    def _generate(self, **kwargs):
        # Every process must keep stepping while any still generates when weights are sharded; FSDP1 gathers its
        # flat parameters around generate (as Seq2SeqTrainer does), FSDP2 and ZeRO-3 gather per module.
        kwargs.setdefault("synced_gpus", self._sharded())
        gathered = contextlib.nullcontext()
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(self.model, FullyShardedDataParallel):
                gathered = FullyShardedDataParallel.summon_full_params(self.model)
        with gathered:
            return self.model.generate(**kwargs)

    def generation_bound(self, dataset=None) -> int | None:
        """The most tokens evaluation generates: the label set's bound (`max_new_tokens`), else (free text) the
        longest target of `dataset`, else the longest a target could be in training (the recipe's
        `data.max_target_length`; what `inference.json` keeps for free text), else None."""
        bound = self.max_new_tokens or longest_labels(dataset)
        if bound is None and self.recipe is not None:
            bound = self.recipe.data.max_target_length
        return bound

    @property
    def _candidate_ids(self):
        """Candidate label ids for rank classification, or None when the label set is unknown or ranking is off."""
        if not self.candidate_labels or not getattr(self.args, "rank_classification", True):
            return None
        key = tuple(self.candidate_labels)  # a label set assigned later gets its own ids
        cached = getattr(self, "_candidate_ids_cache", None)
        if cached is None or cached[0] != key:
            self._candidate_ids_cache = (key, candidate_label_ids(self.processing_class, self.candidate_labels))
        return self._candidate_ids_cache[1]



class Evaluation:
    """One evaluation of [`IA3Seq2SeqTrainer`]: its metrics, its per-example [`EvalOutputs`], the global step it ran
    at, whether it was of the trainer's own `eval_dataset`, and whether it was made after training ended."""

    def __init__(self, step: int, default_dataset: bool, metrics: dict, outputs: EvalOutputs,
                 after_training: bool = False):
        self.step, self.default_dataset, self.metrics, self.outputs = step, default_dataset, metrics, outputs
        self.after_training = after_training

    def eval_results(self) -> dict[str, float]:
        """Its metrics named `eval_*` (not the `epoch` Trainer adds to them)."""
        return {key: value for key, value in self.metrics.items() if key.startswith("eval_")}



def no_extra_metrics(eval_prediction) -> dict[str, float]:
    """The `compute_metrics` of a trainer given none: the built-in metrics alone."""
    return {}
