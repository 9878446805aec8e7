"""The one evaluation kernel: token losses, teacher-forced argmax, rank classification and bounded generation.

`score_batch` runs the whole model once per batch (so FSDP's and autocast's hooks on it run) for the per-example
token losses and the teacher-forced argmax, then reuses that pass's encoder output for rank classification (a
branch-and-bound walk of the labels' prefix tree, see [`rank_candidates`]) and for the bounded greedy generation.
[`IA3Seq2SeqTrainer`]'s `prediction_step`, [`IA3Predictor.score`] and `benchmarks/throughput.py` all call it, so
every number the package reports about an adapter comes from this code. [`EvalOutputs`] holds the per-example
results of a whole pass, which metrics and the report are computed from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ia3_trainer.data.encoding import IGNORE_INDEX
from ia3_trainer.modeling.label_search import best_candidates
from ia3_trainer.modeling.prefix_tree import score_tree


# Candidate rows scored in one decoder pass: 2000 labels x batch 32 would otherwise be 64,000 rows at once.
RANK_CHUNK_ROWS = 4096
# ... and logits made by one pass: mt0's 250k-token vocabulary x 3-token labels x 4096 rows would be 12 GB in fp32.
RANK_CHUNK_LOGITS = 2**28


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed negative log-likelihood and count of label tokens (positions with -100 are ignored).

    With `label_smoothing` ε (the training loss under `label_smoothing_factor`) each token's loss is
    `(1 - ε) * nll + ε * mean over the vocabulary of -log p`: torch's smoothed cross-entropy, the definition of
    transformers' `LabelSmoother`."""
    # Over (tokens, vocab) rows: log-softmax along the contiguous vocab axis (2x faster on CPU than over a transpose).
    losses = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none",
        label_smoothing=label_smoothing,
    ).view(labels.shape)
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def teacher_forced_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a teacher-forced pass over `batch`'s labels, without the labels themselves: the model
    then computes no loss of its own (a mean we would discard; ours is the token sum), and `use_cache=False`, as a
    whole label sequence goes through at once (FSMT builds its causal mask only then; a cache in every decoder block
    also makes torch.compile specialise per layer). `decoder_input_ids` come from the collator, else from
    `model.prepare_decoder_input_ids_from_labels`; a model without that method gets the labels and shifts them
    itself."""
    features = {key: value for key, value in batch.items() if key != "labels"}
    labels = batch["labels"]
    if "decoder_input_ids" not in features:
        if hasattr(model, "prepare_decoder_input_ids_from_labels"):
            features["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        else:
            features["labels"] = labels
    features["use_cache"] = False
    return features


def teacher_forced_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The argmax token at each label position given the gold previous tokens (-100 elsewhere): the PEFT IA3 guide's
    metric, kept for comparison only; it is not a label accuracy."""
    return torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, logits.argmax(dim=-1))


def candidate_label_ids(tokenizer, candidates: list[str]) -> torch.Tensor:
    """Token ids of each candidate label as a target (with EOS), padded with -100: shape (K, L)."""
    encoded = tokenizer(text_target=list(candidates))["input_ids"]
    width = max(len(ids) for ids in encoded)
    return torch.tensor([ids + [IGNORE_INDEX] * (width - len(ids)) for ids in encoded])


def vocab_size(model) -> int:
    """The decoder's vocabulary size from the config (a weight sharded by FSDP may hold no rows here)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if size else model.get_output_embeddings().weight.shape[0]


def score_candidates(
    model, encoder_outputs, attention_mask: torch.Tensor, candidate_ids: torch.Tensor, length_normalize: bool = True,
    chunk_rows: int = RANK_CHUNK_ROWS, chunk_logits: int = RANK_CHUNK_LOGITS,
) -> torch.Tensor:
    """Log-likelihood of each candidate for each example, shape (B, K), from a computed encoder output.

    With `length_normalize` (the default, as in T-Few) the score is the mean token log-probability, so a label of
    more tokens is not penalised for its length. The candidates form a prefix tree: the decoder runs once per example
    for the start token (whose logits score every candidate's first token, and whose cache holds the cross-attention
    keys and values, computed once), then one step per distinct prefix, from its parent's cache
    ([`prefix_tree.score_tree`]: an example's prefixes share its cross-attention keys and values as a view). The cost
    grows with the distinct label prefixes, not with labels x tokens, and no encoder output is projected again per
    candidate. A pass has at most `chunk_rows` (example, prefix) rows and `chunk_logits` logits, and its caches stay
    within `RANK_CACHE_BYTES`, so memory stays bounded with thousands of labels and a large vocabulary. A model
    whose decoder returns no such cache is scored a chunk of whole candidate sequences at a time.
    """
    hidden = _hidden(encoder_outputs)
    candidate_ids = candidate_ids.to(attention_mask.device)
    sequences = [[token for token in row if token != IGNORE_INDEX] for row in candidate_ids.tolist()]
    started = _start_step(model, hidden, attention_mask, candidate_ids, sequences, chunk_rows, chunk_logits)
    if started is None:
        return score_sequences(model, hidden, attention_mask, candidate_ids, length_normalize, chunk_rows,
                               chunk_logits)
    first, cache, limit, keyword = started
    scores = score_tree(model, hidden, attention_mask, first, cache, sequences, limit, keyword)
    if length_normalize:
        scores = scores / torch.tensor([len(sequence) for sequence in sequences], device=scores.device)
    # A decoder whose steps from a cache do not give what a whole sequence gives (FSMT places positions by the
    # tokens it is given) is scored the straightforward way; the longest candidate, decoded whole, tells.
    longest = max(range(len(sequences)), key=lambda k: len(sequences[k]))
    check = score_sequences(model, hidden, attention_mask, candidate_ids[longest:longest + 1], length_normalize)
    if not torch.allclose(scores[:, longest:longest + 1], check, atol=1e-3, rtol=1e-3):
        return score_sequences(model, hidden, attention_mask, candidate_ids, length_normalize, chunk_rows,
                               chunk_logits)
    return scores


def rank_candidates(
    model, encoder_outputs, attention_mask: torch.Tensor, candidate_ids: torch.Tensor, length_normalize: bool = True,
    chunk_rows: int = RANK_CHUNK_ROWS, chunk_logits: int = RANK_CHUNK_LOGITS,
) -> torch.Tensor:
    """The index of the most likely candidate for each example, shape (B,): `score_candidates(...).argmax(-1)`,
    without scoring every candidate.

    A branch-and-bound walk of the labels' prefix tree ([`label_search.best_candidates`]) steps a prefix only while
    some label below it can still beat the best label found for that example (a token's log-probability is at most
    0), so every label that can win is scored exactly and the rest never are. The winners are then decoded whole and
    compared with their scores from the walk; a decoder whose cached steps differ from a whole sequence, or that
    returns no cache, is ranked the straightforward way, as in [`score_candidates`]."""
    hidden = _hidden(encoder_outputs)
    candidate_ids = candidate_ids.to(attention_mask.device)
    sequences = [[token for token in row if token != IGNORE_INDEX] for row in candidate_ids.tolist()]
    started = _start_step(model, hidden, attention_mask, candidate_ids, sequences, chunk_rows, chunk_logits)
    found = None
    if started is not None:
        first, cache, limit, keyword = started
        found = best_candidates(model, hidden, attention_mask, first, cache, sequences, limit, keyword,
                                length_normalize, RANK_CACHE_BYTES)
    if found is not None and bool((found[0] < len(sequences)).all()) and bool(torch.isfinite(found[1]).all()):
        choice, best = found  # (a score that is no number leaves its example unchosen: scored the long way below)
        labels = candidate_ids[choice]
        labels = labels[:, :max(1, int((labels != IGNORE_INDEX).sum(dim=1).max()))]
        outputs = model(encoder_outputs=(hidden,),
                        **teacher_forced_inputs(model, {"attention_mask": attention_mask, "labels": labels}))
        nll, tokens = token_nll(outputs.logits, labels)
        if torch.allclose(best, -(nll / tokens) if length_normalize else -nll, atol=1e-3, rtol=1e-3):
            return choice
    if started is not None and found is None:  # too little pruned: every label along the tree, bounded
        return score_candidates(model, (hidden,), attention_mask, candidate_ids, length_normalize, chunk_rows,
                                chunk_logits).argmax(dim=-1)
    return score_sequences(model, hidden, attention_mask, candidate_ids, length_normalize, chunk_rows,
                           chunk_logits).argmax(dim=-1)


def _hidden(encoder_outputs) -> torch.Tensor:
    return encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state


def _start_step(model, hidden, attention_mask, candidate_ids, sequences, chunk_rows: int, chunk_logits: int):
    """The decoder's start step for the batch, what a walk of the prefix tree starts from: `(first, cache, limit,
    keyword)`: the log-probabilities (B, V) of every candidate's first token, the encoder-decoder cache (which holds
    the cross-attention keys and values, computed once), the rows a pass may have (`chunk_rows`, `chunk_logits`
    logits and `RANK_CACHE_BYTES` of caches) and the cache's keyword. None when the candidates do not share the
    start token or the decoder returns no cache whose rows can be selected."""
    start = _shared_start(model, candidate_ids, sequences)
    if start is None:
        return None
    batch = attention_mask.shape[0]
    outputs = model(encoder_outputs=(hidden,), attention_mask=attention_mask,
                    decoder_input_ids=torch.full((batch, 1), start, device=attention_mask.device), use_cache=True)
    cache = _decoder_cache(outputs)
    if cache is None:
        return None
    keyword = "cache" if getattr(outputs, "cache", None) is not None else "past_key_values"  # transformers 5 / 4
    first = torch.log_softmax(outputs.logits[:, -1].float(), dim=-1)
    per_example = sum(t.numel() * t.element_size() for t in _cache_tensors(cache)) / max(batch, 1)
    limit = max(1, min(chunk_rows, chunk_logits // vocab_size(model), int(RANK_CACHE_BYTES // max(per_example, 1))))
    return first, cache, limit, keyword


# The decoder caches of one rank-classification pass (self- and cross-attention keys and values of every row).
RANK_CACHE_BYTES = 2**30


def _shared_start(model, candidate_ids: torch.Tensor, sequences: list[list[int]]) -> int | None:
    """The decoder start token when every candidate's decoder input is that token followed by the candidate's own
    tokens but the last (what the prefix tree assumes), else None: mBART, PLBART and FSMT start each label with its
    own last token (`shift_tokens_right` wraps it around)."""
    decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=candidate_ids).tolist()
    start = decoder_inputs[0][0]
    for sequence, inputs in zip(sequences, decoder_inputs, strict=True):
        if inputs[0] != start or inputs[1:len(sequence)] != sequence[:-1]:
            return None
    return start


def _decoder_cache(outputs):
    """The encoder-decoder cache a decoder step returned, if it is one whose rows can be selected (else None)."""
    cache = getattr(outputs, "cache", None) or getattr(outputs, "past_key_values", None)
    parts = (getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None))
    if not hasattr(cache, "batch_select_indices") or any(not hasattr(part, "layers") for part in parts):
        return None
    return cache


def _cache_tensors(cache):
    for part in (cache.self_attention_cache, cache.cross_attention_cache):
        for layer in part.layers:
            yield from (tensor for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
                        if isinstance(tensor, torch.Tensor))


def score_sequences(
    model, hidden: torch.Tensor, attention_mask: torch.Tensor, candidate_ids: torch.Tensor,
    length_normalize: bool = True, chunk_rows: int = RANK_CHUNK_ROWS, chunk_logits: int = RANK_CHUNK_LOGITS,
) -> torch.Tensor:
    """What [`score_candidates`] returns, computed the straightforward way: every candidate's whole sequence decoded
    for every example, shortest candidates first, a chunk at a time (each chunk cut to its own longest candidate).
    Used for a model whose decoder returns no cache to reuse, and as the reference that
    `benchmarks/rank_classification.py` and the tests compare with."""
    batch, num_candidates = attention_mask.shape[0], candidate_ids.shape[0]
    lengths = (candidate_ids != IGNORE_INDEX).sum(dim=1)
    order = torch.argsort(lengths, stable=True).tolist()
    lengths = lengths.tolist()
    vocab = vocab_size(model)
    scores = torch.empty(batch, num_candidates, device=attention_mask.device)
    start = 0
    while start < num_candidates:
        count = min(max(1, chunk_rows // max(batch, 1)), num_candidates - start)
        width = max(1, lengths[order[start + count - 1]])  # the longest of the chunk: candidates are sorted
        count = max(1, min(count, chunk_logits // (max(batch, 1) * width * vocab)))
        index = order[start:start + count]
        chunk = candidate_ids[index, :width]
        labels = chunk.repeat(batch, 1)  # example-major: rows b*count ... b*count + count - 1 belong to example b
        outputs = model(
            encoder_outputs=(hidden.repeat_interleave(count, dim=0),),
            attention_mask=attention_mask.repeat_interleave(count, dim=0),
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels),
            use_cache=False,  # whole label sequences at once (FSMT applies its causal mask only without a cache)
        )
        nll, tokens = token_nll(outputs.logits, labels)
        scores[:, index] = (-(nll / tokens) if length_normalize else -nll).view(batch, count)
        start += count
    return scores


@dataclass
class BatchScores:
    """Per-example results of [`score_batch`] for one batch, as tensors on the model's device."""

    nll_sum: torch.Tensor | None = None
    token_count: torch.Tensor | None = None
    teacher_forced: torch.Tensor | None = None
    rank_choice: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that were computed, by name (what the trainer's evaluation loop gathers)."""
        names = ("nll_sum", "token_count", "teacher_forced", "rank_choice", "generated")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def score_batch(
    model,
    batch: dict[str, torch.Tensor],
    *,
    candidate_ids: torch.Tensor | None = None,
    rank_fn: Callable | None = None,
    generate: bool = True,
    max_new_tokens: int | None = None,
    generate_fn: Callable | None = None,
    sharded: bool = False,
    **generate_kwargs,
) -> BatchScores:
    """Score one collated batch (`input_ids`, `attention_mask`, optional `labels`) with `model` (a `PeftModel` or a
    plain seq2seq model). Runs without gradients.

    With labels: one call of the whole model gives `nll_sum`, `token_count` and `teacher_forced`. With
    `candidate_ids` (see [`candidate_label_ids`]) and labels, `rank_choice` is the index of the most likely
    candidate; `rank_fn(model, encoder_outputs, attention_mask)`, when given, replaces that step and returns
    `rank_choice` itself (`IA3Predictor.score` passes one for rows with different label sets). With `generate`,
    `generated` holds greedy output ids bounded by `max_new_tokens`; the encoder output of the loss pass is reused
    when there is one. `generate_fn` replaces `model.generate` (the trainer passes its own
    to add `synced_gpus`); `generate_kwargs` go to it. `seconds` times the rank and generate steps. `sharded` (weights
    gathered module by module across processes: FSDP, ZeRO-3) ranks by decoding every label whole, whose passes
    depend only on the batch size and the labels, so every process runs the same passes; the branch and bound runs
    as many as each process's own texts need.
    """
    result = BatchScores()
    labels = batch.get("labels")
    encoded = None
    with torch.no_grad():
        if labels is not None:
            outputs = model(**teacher_forced_inputs(model, batch))
            result.nll_sum, result.token_count = token_nll(outputs.logits, labels)
            result.teacher_forced = teacher_forced_argmax(outputs.logits, labels)
            # Mixed precision returns the encoder output in fp32; the decoder passes below run outside autocast, in
            # the dtype of the (possibly bf16) frozen weights, so the reused encoding goes back to that dtype.
            dtype = model.get_input_embeddings().weight.dtype
            encoded = (outputs.encoder_last_hidden_state.to(dtype),)
            if candidate_ids is not None or rank_fn is not None:
                started = time.perf_counter()
                if rank_fn is not None:
                    result.rank_choice = rank_fn(model, encoded, batch["attention_mask"])
                elif sharded:
                    result.rank_choice = score_sequences(model, encoded[0], batch["attention_mask"],
                                                         candidate_ids.to(batch["attention_mask"].device)
                                                         ).argmax(dim=-1)
                else:
                    result.rank_choice = rank_candidates(model, encoded, batch["attention_mask"], candidate_ids)
                result.seconds["rank"] = time.perf_counter() - started
        if generate:
            started = time.perf_counter()
            source = {"encoder_outputs": _encoder_output(encoded)} if encoded is not None else {
                "input_ids": batch["input_ids"]}
            bound = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
            generate_fn = generate_fn or model.generate
            result.generated = generate_fn(attention_mask=batch["attention_mask"], **source, **bound,
                                           **generate_kwargs)
            result.seconds["generate"] = time.perf_counter() - started
    return result


def _encoder_output(encoded):
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=encoded[0])


@dataclass
class EvalOutputs:
    """Per-example results of one evaluation pass, as numpy arrays in dataset order (token ids padded with -100).

    `labels` are the reference ids; `generated` the greedy output ids; `teacher_forced` the guide's argmax ids;
    `nll_sum`/`token_count` the token losses; `rank_choice` an index into the candidate labels. Fields that were not
    computed are None. Metrics (`ia3_trainer.evaluation.metrics`) and the report are built from this.
    """

    labels: np.ndarray | None = None
    nll_sum: np.ndarray | None = None
    token_count: np.ndarray | None = None
    teacher_forced: np.ndarray | None = None
    rank_choice: np.ndarray | None = None
    generated: np.ndarray | None = None

    @property
    def loss(self) -> float:
        """Mean token loss over the whole set (not a mean of batch means); nan without labels."""
        if self.nll_sum is None or not np.sum(self.token_count):
            return float("nan")
        return float(np.sum(self.nll_sum) / np.sum(self.token_count))

    @classmethod
    def concatenate(cls, parts: list[dict]) -> EvalOutputs:
        """Join per-batch dicts of arrays (as `BatchScores.as_dict` and `labels`), padding ids with -100."""
        names = [f.name for f in cls.__dataclass_fields__.values()]
        joined = {}
        for name in names:
            arrays = [np.asarray(part[name]) for part in parts if part.get(name) is not None]
            if arrays:
                joined[name] = _pad_concat(arrays)
        return cls(**joined)


def _pad_concat(arrays: list[np.ndarray]) -> np.ndarray:
    if arrays[0].ndim == 1:
        return np.concatenate(arrays)
    width = max(array.shape[1] for array in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=IGNORE_INDEX)
                           for a in arrays])
