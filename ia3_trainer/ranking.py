"""Rank classification (T-Few): score every candidate label with one decoder pass and pick the most likely.

Generation can produce text outside the label set and needs one decoder step per token; ranking always answers
with a known label, reuses the encoder output, and scores all candidates of a batch in a single forward pass.
"""

from __future__ import annotations

import torch


def candidate_label_ids(tokenizer, candidates: list[str]) -> torch.Tensor:
    """Token ids of each candidate label as a target (with EOS), padded with -100: shape (K, L)."""
    encoded = tokenizer(text_target=list(candidates))["input_ids"]
    width = max(len(ids) for ids in encoded)
    return torch.tensor([ids + [-100] * (width - len(ids)) for ids in encoded])


def score_candidates(
    model, encoder_outputs, attention_mask: torch.Tensor, candidate_ids: torch.Tensor, length_normalize: bool = True
) -> torch.Tensor:
    """Log-likelihood of each candidate for each example, shape (B, K), from a computed encoder output.

    With `length_normalize` (the default, as in T-Few) the score is the mean token log-probability, so a label of
    more tokens is not penalised for its length.
    """
    batch, num_candidates = attention_mask.shape[0], candidate_ids.shape[0]
    hidden = encoder_outputs.last_hidden_state.repeat_interleave(num_candidates, dim=0)
    labels = candidate_ids.to(attention_mask.device).repeat(batch, 1)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    outputs = model(
        encoder_outputs=(hidden,),
        attention_mask=attention_mask.repeat_interleave(num_candidates, dim=0),
        decoder_input_ids=decoder_input_ids,
    )
    nll = torch.nn.functional.cross_entropy(
        outputs.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    ).sum(dim=1)
    if length_normalize:
        nll = nll / (labels != -100).sum(dim=1)
    return (-nll).view(batch, num_candidates)
