"""Fewer kernels per step: fused equivalents of T5's many-op modules, and regional compilation of the repeated block.

At the guide's batch size a GPU trains mt0-large far faster than Python can launch its kernels (issue #10: 217 ms of
CPU dispatch against 21 ms of GPU work a step), so every op removed from a step is time saved there:

- `fuse_modules` swaps T5's RMS norm (`T5LayerNorm` and its copies: about 6 ops forward and 15 backward) for torch's
  `rms_norm` (one fused kernel each way on CUDA; a decomposition elsewhere) and `gelu_new` (8 ops forward) for
  transformers' `GELUTanh` (torch's fused `gelu(approximate="tanh")`, the same function). Parameters, state-dict
  names and saved files do not change; results agree to rounding.
- `compile_blocks` compiles each repeated block (`T5Block` and the like) once with `torch.compile`, reused by every
  layer (regional compilation), in training mode only; on CUDA with `mode="reduce-overhead"` each block replays a
  CUDA graph. A compile that fails, at the first step or at a later recompile, falls back to eager with one warning.
"""

from __future__ import annotations

import logging
import re
import traceback
import warnings

import torch


logger = logging.getLogger(__name__)


def fuse_modules(model) -> dict[str, int]:
    """Swap T5-style RMS norms and `gelu_new`/`gelu_fast` activations inside `model` for fused equivalents, in place.

    Only modules whose forward is exactly the one replaced are touched (the classes below, not subclasses a user
    wrote). Returns how many of each were swapped.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    norms = _t5_norm_classes()
    swapped = {"rms_norm": 0, "gelu_tanh": 0}
    for module in model.modules():
        if type(module) in norms:
            module.__class__ = _fused_norm_class(type(module))
            swapped["rms_norm"] += 1
        for name, child in list(module.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                swapped["gelu_tanh"] += 1
    return swapped


def _t5_norm_classes() -> tuple[type, ...]:
    """The RMS norms that compute `weight * (x / sqrt(mean(x^2) + eps))` in fp32 and return the weight's dtype."""
    import importlib

    classes = []
    for module, name in (("t5", "T5LayerNorm"), ("mt5", "MT5LayerNorm"), ("umt5", "UMT5LayerNorm"),
                         ("longt5", "LongT5LayerNorm"), ("switch_transformers", "SwitchTransformersLayerNorm"),
                         ("pix2struct", "Pix2StructLayerNorm"), ("pop2piano", "Pop2PianoLayerNorm")):
        try:
            found = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name, None)
        except ImportError:
            continue
        if found is not None:
            classes.append(found)
    return tuple(classes)


_FUSED_NORMS: dict[type, type] = {}


def _fused_norm_class(base: type) -> type:
    if base not in _FUSED_NORMS:
        _FUSED_NORMS[base] = type(f"Fused{base.__name__}", (base,), {"forward": _rms_norm_forward,
                                                                      "__module__": __name__})
    return _FUSED_NORMS[base]


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # T5LayerNorm: variance in fp32; the result in the weight's dtype when that is half precision, else in fp32.
    # torch's rms_norm computes in fp32 and returns its input's dtype: equal when input and weight share a dtype.
    weight, shape = self.weight, (hidden_states.shape[-1],)
    if hidden_states.dtype == weight.dtype:
        return torch.nn.functional.rms_norm(hidden_states, shape, weight, self.variance_epsilon)
    out_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    normalized = torch.nn.functional.rms_norm(hidden_states.float(), shape, weight.float(), self.variance_epsilon)
    return normalized.to(out_dtype)


# --- regional compilation -----------------------------------------------------------------------------------------


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The children of every `ModuleList` whose members all share one class (T5's `block` lists, BART's `layers`):
    the regions compiled once and reused for every layer."""
    blocks = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            if len({type(child) for child in module}) == 1:
                blocks.extend(module)
    return blocks


class CompiledBlocks:
    """The compiled repeated blocks of one model (what [`compile_blocks`] returns). After a compiler failure every
    block runs eager; `run_step` guards each training step, whose backward compiles too."""

    def __init__(self, count: int, model=None):
        self.count, self.model, self.enabled = count, model, True
        self._grads = None  # the trainable gradients as this step began, kept when a block compiled in the step

    def fail(self, error: BaseException, stacklevel: int = 3) -> None:
        """Turn compilation off for every block, with one warning naming the compiler's own error."""
        self.enabled = False
        cause = getattr(error, "inner_exception", None) or error.__cause__ or error  # BackendCompilerFailed wraps it
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        warnings.warn(f"torch.compile of the repeated blocks failed ({type(cause).__name__}: {text}); training "
                      "continues eager (set training.compile_blocks false to skip compiling)", stacklevel=stacklevel)

    def compiled(self) -> None:
        """A block compiled a graph in this step (its backward compiles at this step's `backward()`): keep the
        gradients the step began with (those of the optimizer step's earlier micro-batches), once."""
        if self._grads is None and self.model is not None:
            self._grads = {param: None if param.grad is None else param.grad.detach().clone()
                           for param in self.model.parameters() if param.requires_grad}

    def run_step(self, step):
        """Run `step()` (a training step: forward and backward). A compiler failure in a block's forward already
        made that block run eager (see `compile_blocks`); one in the backward (AOTAutograd compiles each graph's
        backward at its first `backward()`: the first step, and a later one that recompiled for a new shape) turns
        compilation off, puts back the gradients the step began with, and runs the step again eager. Any other
        error, out of memory included, goes through."""
        if not self.enabled:
            return step()
        self._grads = None
        try:
            return step()
        except Exception as error:
            if not is_compiler_error(error):
                raise
            if self._grads is None:  # no block compiled in this step: its gradients cannot be put back
                raise
            self.fail(error, stacklevel=4)
            for param, grad in self._grads.items():
                param.grad = grad
            return step()
        finally:
            self._grads = None


# torch's compiler stack: a failure raised from one of its functions that compiles (not one that runs compiled code).
_COMPILER_PACKAGES = ("torch/_dynamo/", "torch/_inductor/", "torch/_functorch/")
_COMPILING = re.compile(r"compile(?!d)")  # get_or_compile, _wrapped_bw_compiler, compile_fx; not call_compiled_*


def is_compiler_error(error: BaseException) -> bool:
    """Whether `error` is torch.compile's own failure (a backend that cannot compile: no C++ compiler, an
    unsupported op, a dynamo or inductor bug), which eager execution does not have; never out of memory."""
    from torch._dynamo import exc as dynamo_errors

    chain, seen = [error], set()
    while chain:  # out of memory anywhere in the chain (a compiler that ran out of memory) is not the compiler's fault
        item = chain.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.OutOfMemoryError):
            return False
        chain += [getattr(item, "inner_exception", None), item.__cause__, item.__context__]
    if isinstance(error, dynamo_errors.TorchDynamoException) and not isinstance(
            error, (dynamo_errors.TorchRuntimeError, dynamo_errors.UserError)):  # those: an error of the program
        return True
    if type(error).__module__.startswith("torch._inductor"):
        return True
    # AOTAutograd compiles a backward inside backward() and lets the backend's exception through unwrapped.
    frames = traceback.extract_tb(error.__traceback__)
    return any(_COMPILING.search(frame.name) and any(package in frame.filename.replace("\\", "/")
                                                      for package in _COMPILER_PACKAGES) for frame in frames)


def compile_blocks(model, mode: str | None = None, dynamic: bool | None = None,
                   backend="inductor") -> CompiledBlocks | None:
    """Compile every repeated block of `model` once (see `repeated_blocks`), used in training mode only: evaluation
    and generation (whose shapes change every decoding step) stay eager. `mode` defaults to `"reduce-overhead"`
    (CUDA graphs) on CUDA and `"default"` elsewhere; `backend` is torch.compile's (tests use `"aot_eager"`, which
    traces forward and backward without generating code). Returns the [`CompiledBlocks`], or None when the model has
    no repeated block.

    If compiling fails (no C++ compiler, an unsupported op), every block falls back to eager with one warning, so a
    run never fails for want of a compiler.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        return None
    device = next(model.parameters()).device
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    state = CompiledBlocks(len(blocks), model)
    options = {"mode": mode} if backend == "inductor" else {}
    for block in blocks:
        _wrap(block, dict(options, dynamic=dynamic, backend=backend), state)
    logger.info("Compiling %d repeated blocks (torch.compile mode=%s) for training", len(blocks), mode)
    return state


def _wrap(block: torch.nn.Module, options: dict, state: CompiledBlocks) -> None:
    from torch._dynamo.utils import counters

    eager = block.forward
    compiled = torch.compile(eager, **options)

    def forward(*args, **kwargs):
        if not (block.training and state.enabled):
            return eager(*args, **kwargs)
        graphs = counters["stats"]["unique_graphs"]
        try:
            result = compiled(*args, **kwargs)
        except Exception as error:  # a failed compile, at the first step or a recompile for a new shape later
            if not is_compiler_error(error):
                raise
            state.fail(error)
            return eager(*args, **kwargs)
        if counters["stats"]["unique_graphs"] != graphs:
            state.compiled()
        return result

    block.forward = forward


def mark_step_begin() -> None:
    """Tell CUDA-graph trees that a new training step begins, so the previous step's graph outputs may be reused."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()
