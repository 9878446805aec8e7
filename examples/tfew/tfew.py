"""T-Few's objective as an `IA3Seq2SeqTrainer` subclass: a user-style project built on ia3-trainer's hooks.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (2022),
https://arxiv.org/abs/2205.05638, section 3.2, trains IA3 on a classification task with three losses, summed:

- `lm`: the usual token cross-entropy of the gold label;
- `unlikelihood`: `-log(1 - p)` of every token of every wrong label, so wrong labels become unlikely;
- `length_norm`: softmax cross-entropy over the label set of each label's mean token log-probability, the score
  rank classification picks from.

Evaluation needs nothing new: `IA3Seq2SeqTrainer` already reports `eval_rank_accuracy` (rank classification with
length-normalised scores, as in T-Few) whenever the label set is known.

What the subclass touches: a `tfew` recipe section (`recipe_sections`), `compute_loss`, and `log` (to report each
loss term). Data, model, IA3 config, metrics and saving are the package's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ia3_trainer import IA3Seq2SeqTrainer
from ia3_trainer.modeling.scoring import candidate_label_ids


@dataclass
class TFewSection:
    """The `tfew` recipe section: weights of T-Few's extra loss terms (the paper uses 1 and 1).

    unlikelihood_weight (`float`, *optional*, defaults to `1.0`):
        Weight of the unlikelihood loss on the wrong labels; 0 turns it off.
    length_norm_weight (`float`, *optional*, defaults to `1.0`):
        Weight of the length-normalised loss over the label set; 0 turns it off.
    """

    unlikelihood_weight: float = field(default=1.0, metadata={"help": "Weight of the unlikelihood loss (0 = off)."})
    length_norm_weight: float = field(
        default=1.0, metadata={"help": "Weight of the length-normalised loss over the label set (0 = off)."}
    )

    def __post_init__(self):
        # "key: problem" becomes "<file>: tfew.key: problem" in the recipe error.
        for key in ("unlikelihood_weight", "length_norm_weight"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key}: must be a finite number >= 0, got {value}; 0 turns the term off")


class TFewTrainer(IA3Seq2SeqTrainer):
    """[`IA3Seq2SeqTrainer`] trained with T-Few's loss: `lm + w_ul * unlikelihood + w_ln * length_norm`.

    It needs a label set (`data.label_names`, ClassLabel names, or few distinct text labels). Each logged step
    reports `lm_loss`, `unlikelihood_loss` and `length_norm_loss` next to the total `loss`; `perplexity` comes from
    `lm_loss` alone, so it stays comparable with a plain run.

    Example:

    ```python
    >>> trainer = TFewTrainer.from_recipe("examples/tfew/recipe.json", {"tfew.unlikelihood_weight": 0.5})
    >>> trainer.train()
    ```
    """

    recipe_sections = {"tfew": TFewSection}
    # compute_loss returns a per-batch mean, so Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.candidate_labels or len(self.candidate_labels) < 2:
            raise ValueError(
                "TFewTrainer needs a label set of 2 or more labels; set data.label_names, e.g. "
                "[\"negative\", \"neutral\", \"positive\"]"
            )
        self.tfew = self.recipe.extra["tfew"] if self.recipe is not None else TFewSection()
        self.candidate_ids = candidate_label_ids(self.processing_class, self.candidate_labels)
        self._since_log = defaultdict(list)  # loss terms of the steps since the last log
        self._lm_total, self._lm_steps = 0.0, 0  # for train_perplexity over the whole run

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms = tfew_losses(*candidate_token_log_probs(model, inputs, self.candidate_ids),
                            gold_choice(inputs["labels"], self.candidate_ids))
        loss = (terms["lm"] + self.tfew.unlikelihood_weight * terms["unlikelihood"]
                + self.tfew.length_norm_weight * terms["length_norm"])
        if model.training:
            for name, value in terms.items():
                self._since_log[f"{name}_loss"].append(value.item())
            self._lm_total += terms["lm"].item()
            self._lm_steps += 1
        return (loss, terms) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        from ia3_trainer.evaluation.metrics import perplexity

        if "loss" in logs and self._since_log:
            for key, values in self._since_log.items():
                logs[key] = sum(values) / len(values)
            logs["perplexity"] = perplexity(logs["lm_loss"])  # of the LM term, not of the summed objective
            self._since_log.clear()
        if "train_loss" in logs and self._lm_steps:
            logs["train_perplexity"] = perplexity(self._lm_total / self._lm_steps)
        super().log(logs, start_time)


def gold_choice(labels: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """Index into the candidates of each example's label, found by comparing token ids (both padded with -100)."""
    width = max(labels.shape[1], candidate_ids.shape[1])
    labels = torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=-100)
    candidates = torch.nn.functional.pad(candidate_ids, (0, width - candidate_ids.shape[1]), value=-100)
    match = (labels[:, None, :] == candidates.to(labels.device)[None]).all(dim=-1)  # (B, K)
    if not match.any(dim=-1).all():
        raise ValueError("a training label is not one of the candidate labels; check data.label_names")
    return match.int().argmax(dim=-1)


def candidate_token_log_probs(model, inputs: dict, candidate_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every token of every candidate label for every example: `(B, K, L)`, and its mask.

    One forward pass over B x K rows. Each source is repeated K times rather than encoded once and reused
    (as `ia3_trainer.modeling.scoring.score_candidates` does in evaluation) so that the pass goes through the model as
    given, which keeps DDP's gradient hooks in the loop; with a handful of labels the extra encoder work is small.
    """
    batch, num_candidates = inputs["input_ids"].shape[0], candidate_ids.shape[0]
    labels = candidate_ids.to(inputs["input_ids"].device).repeat(batch, 1)  # (B*K, L), example-major
    unwrapped = model.module if hasattr(model, "module") else model
    outputs = model(
        input_ids=inputs["input_ids"].repeat_interleave(num_candidates, dim=0),
        attention_mask=inputs["attention_mask"].repeat_interleave(num_candidates, dim=0),
        decoder_input_ids=unwrapped.prepare_decoder_input_ids_from_labels(labels=labels),
    )
    mask = labels != -100
    log_probs = outputs.logits.float().log_softmax(dim=-1)
    token = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return token.view(batch, num_candidates, -1), mask.view(batch, num_candidates, -1)


def tfew_losses(token_log_probs: torch.Tensor, mask: torch.Tensor, gold: torch.Tensor) -> dict[str, torch.Tensor]:
    """T-Few's three loss terms from `candidate_token_log_probs` and the gold index of each example.

    `lm` is the mean token NLL of the gold labels (what the model's own loss is for the same batch); `unlikelihood`
    the mean over every token of every wrong label of `-log(1 - p)`; `length_norm` the cross-entropy of the gold
    label under a softmax over the label set of mean token log-probabilities.
    """
    lengths = mask.sum(dim=-1).clamp(min=1)  # (B, K)
    sums = token_log_probs.sum(dim=-1)  # (B, K)
    is_gold = torch.nn.functional.one_hot(gold, sums.shape[1]).bool()
    lm = -sums[is_gold].sum() / lengths[is_gold].sum()
    # log(1 - p) with p kept below 1: a wrong label the model is sure of gives a large, finite loss.
    not_p = torch.log1p(-token_log_probs.exp().clamp(max=1 - 1e-6)) * mask
    wrong = ~is_gold
    unlikelihood = -not_p.sum(dim=-1)[wrong].sum() / lengths[wrong].sum()
    length_norm = torch.nn.functional.cross_entropy(sums / lengths, gold)
    return {"lm": lm, "unlikelihood": unlikelihood, "length_norm": length_norm}
