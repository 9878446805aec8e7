"""The IA3 layer forward used everywhere: scaling in the activations' dtype, and one adapter per row (mixed batches).

peft's IA3 `Linear.forward` builds `1 * vector`, casts the activations to the vector's dtype (fp32) and back, and
applies only the active adapter(s) to every row. [`install`] gives each IA3 `Linear` of a model a forward that
casts the small vector to the activations' dtype instead (`x * scale` in bf16 when the frozen base is bf16; in fp32
it is the very same product), and that reads a per-row adapter while an [`adapter_rows`] block is open: the vectors
of the loaded adapters are stacked into an (A, d) table and row `i` is scaled by the vector of its own adapter, so
one forward serves a batch whose examples use different adapters.

Everything else is peft's: the class is a subclass of peft's `Linear` (so `isinstance(layer, IA3Layer)` holds),
parameters and state-dict names are unchanged, and saving, loading, `merge_and_unload`, `disable_adapter` and
several active adapters at once (peft's product of vectors) run peft's own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from peft.tuners.ia3 import IA3Layer, Linear

from ia3_trainer.errors import InputError


class IA3Forward:
    """Mixin placed before peft's IA3 `Linear` by [`install`]: its `forward` replaces peft's for one active adapter
    and for per-row adapters; everything else falls back to peft's forward."""

    _ia3_rows: _Rows | None = None  # set on each layer by `adapter_rows` while its block is open

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if self._ia3_rows is not None:
            scale = self._ia3_rows.scale(self, x)
        else:
            names = [name for name in self.active_adapters if name in self.ia3_l]
            if len(names) != 1:  # none: the base layer alone; several: peft's product of their vectors
                return super().forward(x, *args, **kwargs)
            scale = self.ia3_l[names[0]].view(-1)
        # Cast the (d,) vector, never the (B, T, d) activations: a no-op in fp32, a bf16 multiply under bf16.
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return result * scale.to(result.dtype)


class IA3Linear(IA3Forward, Linear):
    """peft's IA3 `Linear` with the [`IA3Forward`] forward (what [`install`] turns each layer into)."""


_CLASSES: dict[type, type] = {Linear: IA3Linear}


def install(model) -> int:
    """Give every IA3 `Linear` layer of `model` (a `PeftModel`, or any module holding one) the [`IA3Forward`]
    forward, by switching the layer's class to a subclass of its own; returns how many layers have it.

    Call it once the adapters are in place and before the model is wrapped for DDP or FSDP; calling it again is
    harmless (layers added since, e.g. by `load_adapter` onto new modules, get it too). Parameters, their names,
    `state_dict`, saving and loading are untouched. In fp32 the outputs and gradients are exactly peft's.

    Example:

    ```python
    >>> from peft import IA3Config, get_peft_model
    >>> from ia3_trainer.modeling.layers import install
    >>> model = get_peft_model(base, IA3Config(task_type="SEQ_2_SEQ_LM"))
    >>> count = install(model)  # the IA3 Linear layers, e.g. k, v and wo of every block
    ```
    """
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            if not isinstance(module, IA3Forward):
                cls = type(module)
                if cls not in _CLASSES:
                    _CLASSES[cls] = type(f"IA3{cls.__name__}", (IA3Forward, cls), {"__module__": __name__})
                module.__class__ = _CLASSES[cls]
            count += 1
    return count


def check_adapter_names(adapters: str | Sequence[str], loaded: Sequence[str], rows: int | None = None) -> list[str]:
    """`adapters` (one name, or a list or tuple with one name per row) as a list of names, checked against the
    `loaded` adapters: `TypeError` for a name that is no string, `ValueError` for an unknown name or, with `rows`, a
    list of another length."""
    if isinstance(adapters, str):
        names = [adapters]
    elif isinstance(adapters, (list, tuple)):
        names = list(adapters)
        if rows is not None and len(names) != rows:
            raise InputError(f"adapter: has {len(names)} names for {rows} texts; give one adapter name per text")
    else:
        raise TypeError(f"adapter: must be an adapter name or a list of them, got {type(adapters).__name__}")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"adapter {i + 1}: must be an adapter name (str), got {type(name).__name__}")
        if name not in loaded:
            raise InputError(f"no adapter named {name!r}; loaded adapters: {list(loaded)}")
    return names


@contextmanager
def adapter_rows(model, adapters: str | Sequence[str]):
    """Within the block, row `i` of every batch that reaches the IA3 layers of `model` uses adapter `adapters[i]`.

    `adapters` names a loaded adapter for each row of the batch (B names), or is one name for every row. A layer
    that sees `N = B * k` rows repeats each row's adapter `k` times (`repeat_interleave(k)`), which is how rank
    classification repeats an example per candidate label and beam search per beam. Encoder and decoder layers both
    apply it. A layer that has no vector for a row's adapter (adapters targeting different modules) leaves that row
    unscaled, as peft does for a missing adapter. Blocks nest; on exit the previous state returns, and outside any
    block the active adapter applies as usual. Works with gradients on (the table is then rebuilt at each forward).

    Example:

    ```python
    >>> with adapter_rows(model, ["sentiment", "topic", "sentiment"]):
    ...     logits = model(**batch_of_three).logits
    ```
    """
    layers = [module for module in model.modules() if isinstance(module, IA3Layer)]
    if not layers:
        raise InputError(f"{type(model).__name__} has no IA3 layers; wrap it with peft's IA3 first")
    if not all(isinstance(layer, Linear) for layer in layers):
        raise InputError("one adapter per row works with IA3 Linear layers only (not Conv or quantized layers)")
    if any(layer.merged for layer in layers):
        raise InputError("an adapter is merged into the base weights; unmerge it (model.unmerge_adapter()) to run "
                         "one adapter per row")
    install(model)
    loaded = list(dict.fromkeys(name for layer in layers for name in layer.ia3_l))
    names = check_adapter_names(adapters, loaded)
    if not names:
        raise InputError("adapter: is empty; give one adapter name per row")
    device = next((vector.device for layer in layers for vector in layer.ia3_l.values()), None)
    index = torch.tensor([loaded.index(name) for name in names], device=device)
    rows = _Rows(tuple(loaded), index, single=index.tolist()[0] if isinstance(adapters, str) else None)
    previous = [layer._ia3_rows for layer in layers]
    for layer in layers:
        layer._ia3_rows = rows
    try:
        yield
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer._ia3_rows = state


class _Rows:
    """The per-row adapters of one `adapter_rows` block: indices into the table of loaded adapters."""

    def __init__(self, names: tuple[str, ...], index: torch.Tensor, single: int | None):
        self.names, self.index, self.single = names, index, single  # single: one adapter for every row
        self._scales = {}  # (layer, shape) -> scale, reused while gradients are off (a generation's decoder steps)

    def scale(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The scaling of `layer` for `x`: shape (N, 1, ..., d) with each row's own vector, or (d,) for one name."""
        rows = x.shape[0]
        key = (id(layer), rows, x.dim())
        if key in self._scales:
            return self._scales[key]
        table = adapter_table(layer, self.names)
        if self.single is not None:
            scale = table[self.single]
        else:
            batch = self.index.numel()
            if rows % batch:
                raise RuntimeError(f"an IA3 layer got {rows} rows, not a multiple of the {batch} rows that "
                                   "adapter_rows names; give one adapter name per example of the batch")
            index = self.index if rows == batch else self.index.repeat_interleave(rows // batch)
            scale = table.index_select(0, index.to(table.device)).view(rows, *[1] * (x.dim() - 2), -1)
        if not torch.is_grad_enabled():
            self._scales[key] = scale
        return scale

    def narrow(self, examples: torch.Tensor) -> _Rows:
        """The adapters of `examples` (indices into this block's rows) only; the same table when one adapter serves
        every row."""
        if self.single is not None:
            return self
        return _Rows(self.names, self.index.index_select(0, examples.to(self.index.device)), None)


@contextmanager
def example_rows(model, examples: torch.Tensor):
    """Within the block, a batch that reaches the IA3 layers of `model` holds rows of the examples `examples` (indices
    into the rows of the open [`adapter_rows`] block), `k` rows each, example-major, so each row still gets its own
    adapter: what rank classification opens around a pass that holds some examples' label prefixes (one row per
    example in `examples`, or `k` per example). Outside an `adapter_rows` block, or in one that names one adapter for
    every row, nothing changes."""
    layers = [module for module in model.modules() if getattr(module, "_ia3_rows", None) is not None]
    previous = [layer._ia3_rows for layer in layers]
    for layer in layers:
        layer._ia3_rows = layer._ia3_rows.narrow(examples)
    try:
        yield
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer._ia3_rows = state


def adapter_table(layer, names: Sequence[str]) -> torch.Tensor:
    """The IA3 vectors of `names` in `layer`, stacked: shape (A, d), ones for an adapter the layer does not have.

    With gradients off it is kept on the layer and rebuilt only when an adapter is added, removed or changed (its
    storage, version counter, dtype or device); with gradients on it is rebuilt at each call so that they flow.
    """
    vectors = [layer.ia3_l[name] if name in layer.ia3_l else None for name in names]
    present = [vector for vector in vectors if vector is not None]
    tracked = torch.is_grad_enabled() and any(vector.requires_grad for vector in present)
    key = (tuple(names), tuple((v.data_ptr(), v._version, v.dtype, v.device) for v in present))
    cached = getattr(layer, "_ia3_table", None)
    if not tracked and cached is not None and cached[0] == key:
        return cached[1]
    width = layer.in_features if layer.is_feedforward else layer.out_features
    like = present[0] if present else layer.get_base_layer().weight
    dtype = like.dtype if present else torch.float32
    table = torch.stack([vector.view(-1).to(dtype) if vector is not None
                         else torch.ones(width, dtype=dtype, device=like.device) for vector in vectors])
    if not tracked:
        layer._ia3_table = (key, table)
    return table
