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


# Prefixes of several examples go through one pass while they are this few (fewer passes, and the examples'
# cross-attention keys and values are then copied per prefix, which costs little at this size).
GROUP_ROWS = 256


@dataclass
class Walk:
    """What every pass of one chunk's walk reads: the model, the batch's encoder output and mask, the start step's
    cross-attention keys and values per layer, the tree, and `total` (B, K) that the walk fills."""

    model: object
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    cross: list
    levels: list[Level]
    total: torch.Tensor
    keyword: str
    group_rows: int
    example_rows: object  # layers.example_rows: a pass of a few examples keeps each row's own adapter


def score_tree(model, hidden, attention_mask, first, cache, sequences, limit: int, keyword: str) -> torch.Tensor:
    """Summed log-likelihoods (B, K) of `sequences` for the B examples of `hidden`, whose start step gave the
    log-probabilities `first` (B, V) and the encoder-decoder `cache`. A pass holds at most `limit` prefixes; the
    candidates are cut into chunks whose trees fit (shared prefixes side by side, so few are cut twice)."""
    from ia3_trainer.modeling.layers import example_rows  # peft, imported where rank classification runs

    batch = attention_mask.shape[0]
    start = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
    cross = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
    scores = torch.zeros(batch, len(sequences), device=attention_mask.device)
    order = sorted(range(len(sequences)), key=lambda k: sequences[k])
    k0 = 0
    while k0 < len(order):
        chunk = prefix_chunk(sequences, order, k0, limit)
        levels = tree_levels([sequences[k] for k in chunk], hidden.device)
        walk = Walk(model, hidden, attention_mask, cross, levels, torch.zeros(batch, len(chunk), device=hidden.device),
                    keyword, min(limit, GROUP_ROWS), example_rows)
        _read(walk, cache, 0, batch, first, start, 0)
        scores[:, chunk] = walk.total
        k0 += len(chunk)
    return scores


def _read(walk: Walk, cache, e0: int, e1: int, log_probs, state, depth: int) -> None:
    """Add the tokens read at `depth` from `log_probs` (examples e0..e1 x this depth's prefixes, example-major),
    then descend from the self-attention `state` of those rows."""
    level = walk.levels[depth]
    log_probs = log_probs.view(e1 - e0, -1, log_probs.shape[-1])
    walk.total[e0:e1].index_add_(1, level.reading, log_probs[:, level.at, level.token])
    if level.parents is not None:
        _step(walk, cache, e0, e1, state, depth)


def _step(walk: Walk, cache, e0: int, e1: int, state, depth: int) -> None:
    """One decoder pass for the prefixes of depth + 1 of examples e0..e1, from their parents' rows of `state`; a
    group of examples that would make more than `walk.group_rows` rows is split in two."""
    level, count = walk.levels[depth], e1 - e0
    width = state[0][0].shape[0] // count  # prefixes per example at this depth
    if count > 1 and count * len(level.parents) > walk.group_rows:
        middle = (e0 + e1) // 2
        for a, b in ((e0, middle), (middle, e1)):
            rows = slice((a - e0) * width, (b - e0) * width)
            _step(walk, cache, a, b, [(keys[rows], values[rows]) for keys, values in state], depth)
        return
    rows = len(level.parents)
    parents = (torch.arange(count, device=level.parents.device)[:, None] * width + level.parents).flatten()
    for layer, (keys, values) in zip(cache.self_attention_cache.layers, state, strict=True):
        layer.keys, layer.values = keys.index_select(0, parents), values.index_select(0, parents)
    if count == 1:  # one example: its encoder states shared by every prefix as a broadcast view
        def share(tensor):
            return tensor[e0:e1].expand(rows, *tensor.shape[1:])
    else:
        def share(tensor):
            return tensor[e0:e1].repeat_interleave(rows, dim=0)
    for layer, (keys, values) in zip(cache.cross_attention_cache.layers, walk.cross, strict=True):
        layer.keys, layer.values = share(keys), share(values)
    with walk.example_rows(walk.model, torch.arange(e0, e1, device=level.parents.device)):
        outputs = walk.model(encoder_outputs=(share(walk.hidden),), attention_mask=share(walk.attention_mask),
                             decoder_input_ids=level.tokens.repeat(count, 1), **{walk.keyword: cache}, use_cache=True)
    cache = getattr(outputs, "cache", None) or outputs.past_key_values
    state = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
    _read(walk, cache, e0, e1, torch.log_softmax(outputs.logits[:, -1].float(), dim=-1), state, depth + 1)
