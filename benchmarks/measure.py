"""Measuring helpers shared by the benchmarks: peak memory, padding, dispatched ops and kernel launches per step, and
the PhraseBank tokenizer for models built from a config."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path


class PeakMemory:
    """Peak memory in use above the level at start: the CUDA allocator's peak on GPU; on CPU, live malloc bytes.

    On CPU, RSS would show glibc's high-water mark (freed blocks stay in its arenas), so a thread samples
    glibc's `mallinfo2()` (bytes in use in all arenas plus mmapped blocks) every 2 ms instead; without glibc it
    falls back to RSS.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.read = _live_heap_reader()
            self.start = self.peak = self.read()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
        self.mib = (self.peak - self.start) / 2**20


def _live_heap_reader():
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    mallinfo2.restype = MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return read


class PaddingCounter:
    """Wraps a collate function and counts real (`tokens`) and padded positions in the inputs and labels it makes."""

    def __init__(self, collate):
        self.collate = collate
        self.tokens = self.total = 0

    def __call__(self, features):
        batch = self.collate(features)
        mask, labels = batch["attention_mask"], batch["labels"]
        self.tokens += int(mask.sum()) + int((labels != -100).sum())
        self.total += mask.numel() + labels.numel()
        return batch

    @property
    def fraction(self) -> float:
        return 1 - self.tokens / max(self.total, 1)


class OpCounter:
    """A TorchDispatchMode counting every aten op dispatched while it is on (views and casts included: each costs
    dispatch time on the CPU, even where it launches no kernel)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = collections.Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def count_step_ops(trainer_or_step, batches, device: str, warmup: int = 2, measured: int = 2) -> dict:
    """Dispatched aten ops per training step (mean over `measured` steps after `warmup`) and, on CUDA, kernel launches
    per step (the host's launch calls in torch.profiler over the last one; a CUDA graph replay counts once).
    `trainer_or_step` is a Trainer (whose `max_steps` must be `warmup + measured`) or a `step(batch)` function fed
    from `batches`."""
    import torch

    counter, kernels = OpCounter(), []

    def profile_begin():
        if device != "cuda":
            return None
        # The CUDA runtime calls are CPU-side events: counted there, a CUDA graph replay is one launch (the device
        # still runs all its kernels), which is what a dispatch-bound step pays for.
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        profiler = torch.profiler.profile(activities=activities)
        profiler.__enter__()
        return profiler

    def profile_end(profiler):
        if profiler is not None:
            torch.cuda.synchronize()
            profiler.__exit__(None, None, None)
            kernels.append(sum(1 for event in profiler.events() if is_launch(event.name)))

    if hasattr(trainer_or_step, "train"):
        from transformers import TrainerCallback

        class Toggle(TrainerCallback):
            profiler = None

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step >= warmup:
                    self.profiler = profile_begin() if state.global_step == warmup + measured - 1 else None
                    counter.mode.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step > warmup:
                    counter.mode.__exit__(None, None, None)
                    profile_end(self.profiler)

        trainer_or_step.add_callback(Toggle())
        trainer_or_step.train()
    else:
        for _ in range(warmup):
            trainer_or_step(next(batches))
        for index in range(measured):
            batch = next(batches)
            profiler = profile_begin() if index == measured - 1 else None
            with counter.mode:
                trainer_or_step(batch)
            profile_end(profiler)
    per_step = {op: n / measured for op, n in counter.counts.most_common()}
    result = {"ops_per_step": sum(per_step.values()), "top_ops": dict(list(per_step.items())[:12]), "ops": per_step}
    if kernels:
        result["kernels_per_step"] = kernels[-1]
    return result


# CUDA runtime and driver calls that start work on the device: kernels (one by one or cooperative) and graph replays.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
                "cuLaunchKernelEx", "cudaGraphLaunch", "cuGraphLaunch")


def is_launch(name: str) -> bool:
    """Whether a profiler event is a host call that launches device work (`LAUNCH_CALLS`, any API version suffix)."""
    return name.split("_v")[0] in LAUNCH_CALLS


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int) -> int:
    """A Unigram tokenizer trained on `texts`, with the three PhraseBank labels as whole tokens; returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    # Whole-word label tokens, as mt0's vocabulary has them: labels are 2 tokens with EOS and fit max length 3.
    wrapped.add_tokens(["negative", "neutral", "positive"])
    wrapped.save_pretrained(folder)
    return len(wrapped)
