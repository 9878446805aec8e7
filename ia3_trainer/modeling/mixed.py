"""Scoring a batch whose rows use different adapters: [`score_rows`] runs the one evaluation kernel
(`ia3_trainer.modeling.scoring.score_batch`) inside an [`~ia3_trainer.modeling.layers.adapter_rows`] block, each row
ranked against its own adapter's labels; [`IA3Predictor`] calls it for a batch of texts that name different
adapters."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from ia3_trainer.modeling.layers import adapter_rows
from ia3_trainer.modeling.scoring import BatchScores, rank_candidates, score_batch


def score_rows(model, batch: dict[str, torch.Tensor], adapters: Sequence[str], *,
               bounds: Sequence[int | None] | None = None, candidates: dict[str, torch.Tensor] | None = None,
               pad_token_id: int = 0) -> BatchScores:
    """[`~ia3_trainer.modeling.scoring.score_batch`] of a batch whose row `i` uses adapter `adapters[i]`, in one
    forward.

    Each row is ranked against the candidate labels of its own adapter (`candidates`: adapter name -> ids as
    [`~ia3_trainer.modeling.scoring.candidate_label_ids`] makes them; `rank_choice` is -1 for a row whose adapter has
    none), and generation runs up to the longest of the rows' `bounds`, each row then cut to its own: greedy decoding
    is per row, so generating longer never changes a row's first tokens. Positions past a row's bound hold
    `pad_token_id`, as generate pads a row that has finished.
    """
    adapters, candidates = list(adapters), candidates or {}
    bounds = list(bounds) if bounds is not None else [None] * len(adapters)
    names = list(dict.fromkeys(adapters))
    mixed = len(names) > 1
    # Rows of one adapter with a label set: plain rank classification; otherwise per adapter, -1 for rows without.
    per_adapter = candidates and (mixed or names[0] not in candidates)
    rank_fn = partial(_rank_rows, adapters, candidates) if per_adapter else None
    with adapter_rows(model, adapters if mixed else names[0]):
        scores = score_batch(model, batch, candidate_ids=None if rank_fn else candidates.get(names[0]),
                             rank_fn=rank_fn, max_new_tokens=None if None in bounds else max(bounds))
    generated = scores.generated
    if generated is not None and len(set(bounds)) > 1:
        # Keep the decoder start token (the one-token decoder prompt of a seq2seq generate) and the row's own bound.
        keep = torch.tensor([1 + bound if bound else generated.shape[1] for bound in bounds])
        beyond = torch.arange(generated.shape[1])[None, :] >= keep[:, None]
        generated.masked_fill_(beyond.to(generated.device), pad_token_id)
    return scores


def _rank_rows(adapters: list[str], candidates: dict, model, encoded, attention_mask) -> torch.Tensor:
    """`rank_choice` of rows that use different adapters: the rows of each adapter against its own label set."""
    choice = torch.full((len(adapters),), -1, dtype=torch.long, device=attention_mask.device)
    for name, candidate_ids in candidates.items():
        index = torch.tensor([i for i, row in enumerate(adapters) if row == name], device=attention_mask.device)
        if len(index):
            with adapter_rows(model, name):
                choice[index] = rank_candidates(model, (encoded[0][index],), attention_mask[index], candidate_ids)
    return choice
