"""Rank classification over the prefix tree of the candidate labels, one example at a time.

[`score_candidates`] (in `scoring`) runs the decoder's start step for a whole batch and hands its cache here. Each
example then walks the tree level by level: one decoder pass per level scores every distinct prefix of that depth,
from its parent's self-attention keys and values. The example's cross-attention keys and values, computed once by
the start step, are shared by all its prefixes as a broadcast view (`expand`): nothing is copied per prefix but the
few self-attention rows of its parent. Each level's log-probabilities score the tokens that follow its prefixes,
so a candidate's last token (and a label of one token) costs no decoder pass of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Level:
    """One depth of the tree: which candidates read a token here (`reading`), from which prefix of this depth
    (`at`) and which token (`token`); then the next depth's prefixes as their parent here (`parents`) and their last
    token (`tokens`), None at the deepest level."""

    reading: torch.Tensor
    at: torch.Tensor
    token: torch.Tensor
    parents: torch.Tensor | None
    tokens: torch.Tensor | None


def tree_levels(sequences: list[list[int]], device) -> list[Level]:
    """The levels of the prefix tree of `sequences` (token ids without padding), from the empty prefix down."""
    levels = []
    level: dict = {(): 0}  # the prefixes of this depth -> their index among them
    for depth in range(max(len(sequence) for sequence in sequences)):
        reading = [k for k, sequence in enumerate(sequences) if len(sequence) > depth]
        following: dict = {}
        for k in reading:
            if len(sequences[k]) > depth + 1:
                following.setdefault(tuple(sequences[k][:depth + 1]), len(following))
        parents = tokens = None
        if following:
            parents = torch.tensor([level[prefix[:-1]] for prefix in following], device=device)
            tokens = torch.tensor([[prefix[-1]] for prefix in following], device=device)
        levels.append(Level(
            reading=torch.tensor(reading, device=device),
            at=torch.tensor([level[tuple(sequences[k][:depth])] for k in reading], device=device),
            token=torch.tensor([sequences[k][depth] for k in reading], device=device),
            parents=parents, tokens=tokens,
        ))
        if not following:
            break
        level = following
    return levels


def prefix_chunk(sequences: list[list[int]], order: list[int], k0: int, limit: int) -> list[int]:
    """The candidates `order[k0:k]` for the largest `k` whose prefix tree has at most `limit` prefixes at any depth
    (at least one candidate)."""
    levels: list[set] = []
    k = k0
    while k < len(order):
        sequence = sequences[order[k]]
        new = [tuple(sequence[:depth + 1]) for depth in range(len(sequence) - 1)]
        grown = [len(levels[d]) + (prefix not in levels[d]) if d < len(levels) else 1 for d, prefix in enumerate(new)]
        if k > k0 and max(grown, default=0) > limit:
            break
        for depth, prefix in enumerate(new):
            if depth == len(levels):
                levels.append(set())
            levels[depth].add(prefix)
        k += 1
    return order[k0:k]


def score_tree(model, hidden, attention_mask, first, cache, sequences, limit: int, keyword: str) -> torch.Tensor:
    """Summed log-likelihoods (B, K) of `sequences` for the B examples of `hidden`, whose start step gave the
    log-probabilities `first` (B, V) and the encoder-decoder `cache`. A pass holds at most `limit` prefixes; the
    candidates are cut into chunks whose trees fit (shared prefixes side by side, so few are cut twice)."""
    batch = attention_mask.shape[0]
    start_self = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
    cross = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
    total = torch.zeros(batch, len(sequences), device=attention_mask.device)
    order = sorted(range(len(sequences)), key=lambda k: sequences[k])
    k0 = 0
    while k0 < len(order):
        chunk = prefix_chunk(sequences, order, k0, limit)
        levels = tree_levels([sequences[k] for k in chunk], attention_mask.device)
        for example in range(batch):
            rows = slice(example, example + 1)
            state = [(keys[rows], values[rows]) for keys, values in start_self]
            total[example, chunk] = _walk(model, hidden[rows], attention_mask[rows], first[rows], cache, state,
                                          [(keys[rows], values[rows]) for keys, values in cross], levels, keyword,
                                          len(chunk))
        k0 += len(chunk)
    return total


def _walk(model, hidden, attention_mask, log_probs, cache, state, cross, levels, keyword, count) -> torch.Tensor:
    """One example's summed log-likelihoods of `count` candidates down the tree `levels`."""
    total = torch.zeros(count, device=attention_mask.device)
    for level in levels:
        total.index_add_(0, level.reading, log_probs[level.at, level.token])
        if level.parents is None:
            break
        rows = len(level.parents)
        for layer, (keys, values) in zip(cache.self_attention_cache.layers, state, strict=True):
            layer.keys, layer.values = keys.index_select(0, level.parents), values.index_select(0, level.parents)
        for layer, (keys, values) in zip(cache.cross_attention_cache.layers, cross, strict=True):
            layer.keys, layer.values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
        outputs = model(encoder_outputs=(hidden.expand(rows, -1, -1),), attention_mask=attention_mask.expand(rows, -1),
                        decoder_input_ids=level.tokens, **{keyword: cache}, use_cache=True)
        cache = getattr(outputs, "cache", None) or outputs.past_key_values
        state = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
        log_probs = torch.log_softmax(outputs.logits[:, -1].float(), dim=-1)
    return total
