"""The most likely candidate label of each example, found without scoring every label: a branch-and-bound walk of
the labels' prefix tree.

[`rank_candidates`] (in `scoring`) runs the decoder's start step for a batch and hands its cache here. A label's
score is the mean (without length normalisation, the sum) of its tokens' log-probabilities, each at most 0, so a
prefix whose tokens sum to `S` bounds every label below it: by `S / n`, `n` the longest of them (or by `S`). Each
example first follows its most likely token down to a label (a few passes of one row per example), which gives a
score to beat; then the tree is walked level by level, and a prefix gets a decoder step only while its bound can
still reach the best label found so far for its example. Every label that can win is scored exactly, so the winner
is the label [`score_candidates`] ranks first (ties to the lowest index, as `argmax`), up to float rounding between
passes of different sizes; a label left out had a bound below a score already found. How much is left out depends
on the model: a trained adapter that is sure of its label leaves out nearly all of the tree, a flat distribution
nearly nothing: when one level's prefixes would hold more cache than allowed, the search gives up and every label is
scored the bounded way ([`prefix_tree.score_tree`]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# A prefix is stepped while its bound is within this much of the best score found (log-probability units), so that
# fp32 rounding in passes of different sizes does not leave out a label that ties the winner.
TOLERANCE = 1e-4


@dataclass
class Tree:
    """The prefix tree of the candidates: node 0 is the empty prefix; each other node a prefix that some candidate
    continues. `token` is a node's last token and `longest` the most tokens of a candidate through it; the children
    of node `v` are `child_nodes[child_start[v]:child_start[v] + child_count[v]]`, and the candidates that read their
    last token at `v` are `end_candidates[...]` (with `end_tokens`) by `end_start` and `end_count` alike."""

    token: torch.Tensor
    longest: torch.Tensor
    child_start: torch.Tensor
    child_count: torch.Tensor
    child_nodes: torch.Tensor
    end_start: torch.Tensor
    end_count: torch.Tensor
    end_candidates: torch.Tensor
    end_tokens: torch.Tensor
    lengths: torch.Tensor


def build_tree(sequences: list[list[int]], device) -> Tree:
    """The [`Tree`] of `sequences` (token ids without padding, at least one token each)."""
    index: dict = {(): 0}
    token, longest, children, ends = [0], [0], [[]], [[]]
    for k, sequence in enumerate(sequences):
        node = 0
        longest[0] = max(longest[0], len(sequence))
        for depth in range(len(sequence) - 1):
            prefix = tuple(sequence[:depth + 1])
            child = index.get(prefix)
            if child is None:
                child = index[prefix] = len(token)
                token.append(sequence[depth])
                longest.append(0)
                children.append([])
                ends.append([])
                children[node].append(child)
            node = child
            longest[node] = max(longest[node], len(sequence))
        ends[node].append(k)

    def csr(lists):
        count = torch.tensor([len(items) for items in lists], device=device)
        flat = torch.tensor([item for items in lists for item in items], dtype=torch.long, device=device)
        return torch.cumsum(count, 0) - count, count, flat

    child_start, child_count, child_nodes = csr(children)
    end_start, end_count, end_candidates = csr(ends)
    return Tree(
        token=torch.tensor(token, device=device), longest=torch.tensor(longest, dtype=torch.float, device=device),
        child_start=child_start, child_count=child_count, child_nodes=child_nodes, end_start=end_start,
        end_count=end_count, end_candidates=end_candidates,
        end_tokens=torch.tensor([sequences[k][-1] for k in end_candidates.tolist()], device=device),
        lengths=torch.tensor([len(sequence) for sequence in sequences], dtype=torch.float, device=device),
    )


def _pairs(nodes: torch.Tensor, start: torch.Tensor, count: torch.Tensor):
    """Each row (whose node is `nodes[row]`) paired with each of its node's edges: (row, edge) index tensors."""
    per_row = count[nodes]
    rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), per_row)
    before = torch.cumsum(per_row, 0) - per_row
    edges = start[nodes][rows] + torch.arange(len(rows), device=nodes.device) - before[rows]
    return rows, edges


@dataclass
class Search:
    """One batch's search: the model's inputs, the tree, and per example the best score found and its candidate."""

    model: object
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    cross: list
    tree: Tree
    length_normalize: bool
    limit: int
    keyword: str
    example_rows: object
    best: torch.Tensor
    choice: torch.Tensor
    cache: object  # the encoder-decoder cache each pass reads its rows from
    cache_bytes: int  # the most the self-attention caches of one level may hold

    def record(self, examples: torch.Tensor, values: torch.Tensor, candidates: torch.Tensor) -> None:
        """Take `values` of `candidates` (for `examples`) where they beat the best so far (ties: lowest index)."""
        if not len(values):
            return
        top = torch.full_like(self.best, -torch.inf).scatter_reduce(0, examples, values, "amax")
        at_top = values >= top[examples]
        lowest = torch.full_like(self.choice, len(self.tree.lengths)).scatter_reduce(
            0, examples[at_top], candidates[at_top], "amin")
        better = (top > self.best) | ((top == self.best) & (lowest < self.choice))
        self.best = torch.where(better, top, self.best)
        self.choice = torch.where(better, lowest, self.choice)

    def read(self, examples, nodes, sums, log_probs, greedy: bool):
        """Score the candidates that end at these rows' nodes and return the children worth a step: (parent row,
        example, node, sum of its tokens' log-probabilities). `greedy` keeps each row's most likely continuation
        only (a label ending here when that is the most likely)."""
        tree = self.tree
        rows, edges = _pairs(nodes, tree.end_start, tree.end_count)
        candidates = tree.end_candidates[edges]
        end_log_probs = log_probs[rows, tree.end_tokens[edges]]
        parents, edges = _pairs(nodes, tree.child_start, tree.child_count)
        children = tree.child_nodes[edges]
        child_log_probs = log_probs[parents, tree.token[children]]
        if greedy:
            floor = torch.full((len(nodes),), -torch.inf, device=log_probs.device)
            top_end = floor.scatter_reduce(0, rows, end_log_probs, "amax")
            top_child = floor.scatter_reduce(0, parents, child_log_probs, "amax")
            stop = top_end >= top_child
            keep = (end_log_probs == top_end[rows]) & stop[rows]
            rows, candidates, end_log_probs = rows[keep], candidates[keep], end_log_probs[keep]
        totals = sums[rows] + end_log_probs
        self.record(examples[rows], totals / tree.lengths[candidates] if self.length_normalize else totals,
                    candidates)
        totals = sums[parents] + child_log_probs
        if greedy:  # one child per row (the first of equally likely ones: a flat model must not walk the whole tree)
            kept = ((child_log_probs == top_child[parents]) & ~stop[parents]).nonzero().squeeze(1)
            first = torch.ones_like(kept, dtype=torch.bool)
            first[1:] = parents[kept[1:]] != parents[kept[:-1]]  # pairs come row by row
            keep = torch.zeros_like(parents, dtype=torch.bool).index_fill_(0, kept[first], True)
        else:
            bounds = totals / tree.longest[children] if self.length_normalize else totals
            keep = bounds >= self.best[examples[parents]] - TOLERANCE
        return parents[keep], examples[parents[keep]], children[keep], totals[keep]

    def walk(self, first: torch.Tensor, state: list, greedy: bool) -> None:
        """From the start step (`first`: every example's log-probabilities after the start token; `state`: its
        self-attention keys and values per layer), read and step level by level until no prefix is worth a step."""
        batch = len(first)
        examples = torch.arange(batch, device=first.device)
        frontier = self.read(examples, torch.zeros_like(examples), torch.zeros(batch, device=first.device), first,
                             greedy)
        while len(frontier[0]):
            row_bytes = sum(keys[:1].numel() * keys.element_size() * 2 for keys, _ in state)  # keys and values
            if len(frontier[0]) * row_bytes * 2 > self.cache_bytes:  # this level's caches, and their joining
                raise TooManyPrefixes
            parts, states = [], []
            stepped = 0
            for c0 in range(0, len(frontier[0]), self.limit):
                parents, examples, nodes, sums = (part[c0:c0 + self.limit] for part in frontier)
                log_probs, chunk_state = self.step(state, parents, examples, nodes)
                parent, *rest = self.read(examples, nodes, sums, log_probs, greedy)
                parts.append((parent + stepped, *rest))
                states.append(chunk_state)
                stepped += len(parents)
                del log_probs  # (rows, V): not alive during the next pass
            frontier = tuple(torch.cat(column) for column in zip(*parts, strict=True))
            state = [tuple(torch.cat(tensors) for tensors in zip(*layer, strict=True))
                     for layer in zip(*states, strict=True)]

    def step(self, state, parents, examples, nodes):
        """One decoder pass for these prefixes from their parents' rows of `state`: their log-probabilities and
        self-attention keys and values."""
        cache = self.cache
        for layer, (keys, values) in zip(cache.self_attention_cache.layers, state, strict=True):
            layer.keys, layer.values = keys.index_select(0, parents), values.index_select(0, parents)
        for layer, (keys, values) in zip(cache.cross_attention_cache.layers, self.cross, strict=True):
            layer.keys, layer.values = keys.index_select(0, examples), values.index_select(0, examples)
        with self.example_rows(self.model, examples):
            outputs = self.model(encoder_outputs=(self.hidden.index_select(0, examples),),
                                 attention_mask=self.attention_mask.index_select(0, examples),
                                 decoder_input_ids=self.tree.token[nodes][:, None], **{self.keyword: cache},
                                 use_cache=True)
        cache = getattr(outputs, "cache", None) or outputs.past_key_values
        self.cache = cache
        state = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
        return torch.log_softmax(outputs.logits[:, -1].float(), dim=-1), state


class TooManyPrefixes(Exception):
    """The prefixes still worth a step at one level would hold more cache than allowed (little could be pruned)."""


def best_candidates(model, hidden, attention_mask, first, cache, sequences, limit: int, keyword: str,
                    length_normalize: bool = True, cache_bytes: int = 2**30):
    """The most likely of `sequences` for each of the B examples of `hidden` and its score, (B,) each, from the
    start step's log-probabilities `first` (B, V) and encoder-decoder `cache`; a pass has at most `limit` rows.
    None when the prefixes worth a step at one level would hold more than `cache_bytes` of self-attention cache (a
    model too unsure to prune much): the caller then scores every label, a bounded chunk at a time."""
    from ia3_trainer.modeling.layers import example_rows  # peft, imported where rank classification runs

    batch = attention_mask.shape[0]
    search = Search(model, hidden, attention_mask, [(layer.keys, layer.values)
                                                    for layer in cache.cross_attention_cache.layers],
                    build_tree(sequences, hidden.device), length_normalize, limit, keyword, example_rows,
                    torch.full((batch,), -torch.inf, device=hidden.device),
                    torch.full((batch,), len(sequences), dtype=torch.long, device=hidden.device), cache, cache_bytes)
    start = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
    try:
        search.walk(first, start, greedy=True)  # a score to beat, from each example's most likely path
        search.walk(first, start, greedy=False)
    except TooManyPrefixes:
        return None
    return search.choice, search.best
