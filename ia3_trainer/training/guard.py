"""The non-finite guard: a nan or inf loss or gradient never reaches the IA3 vectors, and the host is not asked about
it every step.

Reading a device value back (`loss.item()`, `bool(torch.isnan(loss))`) makes the CPU wait for the GPU, so it can no
longer queue the next step's kernels while the current ones run: at the guide's batch size on a fast GPU that wait
costs more than the step itself (issue #10). The guard instead decides on the device:

- after every micro-batch it records whether the loss was finite (`observe`);
- before every optimizer step (a `register_step_pre_hook` on the torch optimizer) it adds whether every gradient is
  finite, agrees with the other processes (an all-reduce, no host read), and, for optimizers that support it (torch's
  fused Adam/AdamW/SGD, transformers' default `adamw_torch_fused`), hands the flag to the optimizer as `found_inf`,
  the protocol `torch.amp.GradScaler` uses: the fused kernel then leaves the parameters, the moments and the step
  count untouched;
- the host reads the flags only at points where it waits anyway (`check`: each log, save, evaluation, and the end
  of training), raising the one-line error for `non_finite_loss: "stop"` or warning for `"skip"`.

Optimizers without that support (or none the guard can hook) get the old behaviour: a host read before every
optimizer step, which drops the gradients of a non-finite step (`skip`) or raises before it is applied (`stop`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from ia3_trainer.errors import NonFiniteLossError


logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """See the module docstring. `step` returns the global step the next optimizer step will make (1-based);
    `last_checkpoint` the checkpoint a `stop` error names."""

    def __init__(self, mode: str, step: Callable[[], int], last_checkpoint: Callable[[], str | None]):
        if mode not in ("stop", "skip"):
            raise ValueError(f"non_finite_loss: must be 'stop' or 'skip', got {mode!r}")
        self.mode, self._step, self._last_checkpoint = mode, step, last_checkpoint
        self.attached = self.on_device = self._set_found_inf = False
        self._optimizer, self._handles = None, []
        self.reset()

    def reset(self) -> None:
        """Forget every record, at the start of each `train()`: a run stopped by a non-finite step (whose error may
        have been raised inside the optimizer's hook, before the step closed) leaves nothing to the next one."""
        self._pending = None  # this optimizer step's "a loss was not finite", on the device
        self._loss = None  # this optimizer step's last loss (the value the error message shows)
        self._logged = None  # skip: the sum of what this optimizer step's micro-batches gave Trainer to log
        # On the device since the last check: skipped steps, the first of them, its loss, and what skipped steps
        # added to Trainer's logged loss sum (a finite loss whose gradients were not, the finite micro-batches of an
        # accumulated step, the other processes' losses).
        self._skipped = self._first_step = self._first_loss = self._skipped_loss = None
        self.unlogged = 0  # skipped steps found by checks since the logged loss was last corrected
        self.total = 0  # skipped steps in this run
        self.unlogged_loss = self.total_loss = 0.0  # what those skipped steps added to the logged loss sums
        self.steps_unlogged = self.steps_total = 0  # optimizer steps, counted on the host

    def attach(self, optimizer) -> None:
        """Hook the torch optimizer under `optimizer` (an accelerate `AcceleratedOptimizer` or a torch one); a new
        optimizer (Trainer builds another with `auto_find_batch_size` or `model_init`) is hooked too."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is self._optimizer or not isinstance(inner, torch.optim.Optimizer):
            return
        for handle in self._handles:
            handle.remove()
        if self._set_found_inf and self._optimizer is not None and hasattr(self._optimizer, "found_inf"):
            del self._optimizer.found_inf
        self._set_found_inf = False
        # Fused torch optimizers read `found_inf` and skip the whole update on the device when it is nonzero.
        self.on_device = bool(getattr(inner, "_step_supports_amp_scaling", False)) and all(
            group.get("fused") for group in inner.param_groups)
        self._handles = [inner.register_step_pre_hook(self._before_step),
                         inner.register_step_post_hook(self._after_step)]
        self._optimizer, self.attached = inner, True

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """Record one micro-batch's loss; returns the loss to log (0 in place of a non-finite one under `skip`;
        what a skipped step logged is then taken out of the mean by `correct`)."""
        loss = loss.detach()
        bad = ~torch.isfinite(loss)
        self._pending = bad if self._pending is None else self._pending | bad
        self._loss = loss
        if not self.attached and self.mode == "stop" and bool(bad):  # no optimizer hook: decide now, on the host
            self._record(bad.float())
            self.check()
        if self.mode == "stop":
            return loss
        logged = torch.where(bad, torch.zeros_like(loss), loss)
        self._logged = logged if self._logged is None else self._logged + logged
        return logged

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._set_found_inf:  # ours, left by a step that raised before the post-hook ran
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
            self._set_found_inf = False
        all_params = [p for group in optimizer.param_groups for p in group["params"]]
        params = [p for p in all_params if p.grad is not None]
        if not all_params:
            return
        # Every process takes part in the all-reduce below, also one that holds no gradient (a sharded parameter
        # whose shard is elsewhere), or the others would wait for it.
        device = params[0].grad.device if params else all_params[0].device
        found = torch.zeros(1, device=device)
        scaled = any(getattr(optimizer, name, None) is not None for name in ("found_inf", "grad_scale"))
        if params and not scaled:
            # GradScaler's own check: one fused kernel per device sets `found` when any gradient is not finite. Under
            # fp16 GradScaler checks the gradients itself and skips overflow steps by design (that is no error).
            local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]  # FSDP2: DTensor
            torch._amp_foreach_non_finite_check_and_unscale_(local, found, torch.ones(1, device=device))
        if self._pending is not None:
            found = torch.maximum(found, self._pending.to(device=device, dtype=found.dtype).reshape(1))
        logged = self._logged_sum(device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One all-reduce: every process skips together (a flag summed over processes is nonzero when any is),
            # and Trainer logs the mean over processes of their loss sums.
            both = torch.cat([found, logged.reshape(1)])
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.SUM)
            found, logged = (both[:1] > 0).to(found.dtype), both[1] / torch.distributed.get_world_size()
        self._record(found, logged=logged)
        if scaled:  # the scaler's own flag (a gradient overflow) and ours (a non-finite loss) both skip the step
            existing = getattr(optimizer, "found_inf", None)
            optimizer.found_inf = found.reshape(()) if existing is None else torch.maximum(
                existing, found.reshape(()).to(existing.device, existing.dtype))
        elif self.on_device:
            optimizer.found_inf = found.reshape(())  # 0-dim, as GradScaler passes it
            self._set_found_inf = True
        elif bool(found.item()):  # an optimizer that cannot skip on the device: decide on the host
            if self.mode == "stop":
                self.check()
            for param in params:  # no gradient: the optimizer leaves the parameter and its state alone
                param.grad = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._set_found_inf:  # a GradScaler deletes its own after the step
            del optimizer.found_inf
            self._set_found_inf = False
        self._close_step()

    def step_end(self, step: int) -> None:
        """After optimizer step `step` (Trainer's `on_step_end`): a step whose optimizer never ran its hooks (fp16
        GradScaler does not call `optimizer.step()` when a gradient overflowed, which a non-finite loss causes) is
        recorded here, so its flag does not carry over to the next step."""
        if self._pending is None:
            return
        found = self._pending.to(torch.float32).reshape(())
        self._record(found, step=step)
        self._close_step()

    def _close_step(self) -> None:
        self._pending = self._loss = self._logged = None
        self.steps_unlogged += 1
        self.steps_total += 1

    def correct(self, logs: dict) -> None:
        """Leave skipped steps out of the mean `loss` and `train_loss` in `logs`, in place."""
        if "loss" in logs:
            if self.unlogged:
                logs["loss"] = self.mean_without_skipped(logs["loss"], self.steps_unlogged, self.unlogged,
                                                         self.unlogged_loss)
            self.unlogged = self.steps_unlogged = 0
            self.unlogged_loss = 0.0
        if "train_loss" in logs and self.total:
            logs["train_loss"] = self.mean_without_skipped(logs["train_loss"], self.steps_total, self.total,
                                                           self.total_loss)

    def _logged_sum(self, device) -> torch.Tensor:
        return (self._logged if self._logged is not None else torch.zeros(())).to(device, torch.float32)

    def _record(self, found: torch.Tensor, step: int | None = None, logged: torch.Tensor | None = None) -> None:
        """Add one optimizer step's flag (`found`, 0 or 1) to the device records; `logged` is what the step added
        to the logged loss sum (this process's, unless given)."""
        found = found.reshape(())
        step = torch.full((), self._step() if step is None else step, device=found.device, dtype=torch.long)
        loss = (self._loss if self._loss is not None else torch.zeros(())).to(found.device, torch.float32)
        logged = self._logged_sum(found.device) if logged is None else logged.reshape(())
        if self._skipped is None:
            self._skipped = torch.zeros((), device=found.device)
            self._first_step = torch.full((), -1, device=found.device, dtype=torch.long)
            self._first_loss = torch.zeros((), device=found.device)
            self._skipped_loss = torch.zeros((), device=found.device)
        first = (found > 0) & (self._first_step < 0)
        self._first_step = torch.where(first, step, self._first_step)
        self._first_loss = torch.where(first, loss, self._first_loss)
        self._skipped = self._skipped + found
        self._skipped_loss = self._skipped_loss + found * logged

    def check(self) -> None:
        """Read the flags (one host sync): raise the one-line error for `stop`, log one warning for `skip`."""
        if self._skipped is None:
            return
        skipped, first, loss = int(self._skipped.item()), int(self._first_step.item()), float(self._first_loss.item())
        skipped_loss = float(self._skipped_loss.item())
        self._skipped = self._first_step = self._first_loss = self._skipped_loss = None
        if not skipped:
            return
        self.unlogged += skipped
        self.total += skipped
        self.unlogged_loss += skipped_loss
        self.total_loss += skipped_loss
        what = (f"loss is {loss} at step {first}" if not math.isfinite(loss)
                else f"gradients are not finite at step {first}")
        if self.mode == "stop":
            checkpoint = self._last_checkpoint() or "none (no checkpoint was saved yet)"
            raise NonFiniteLossError(
                key="training.non_finite_loss", problem=what,
                fix="lower training.learning_rate, set training.max_grad_norm or check the data (or set "
                    f"training.non_finite_loss to 'skip'); the last checkpoint is {checkpoint}",
            )
        more = f" (and {skipped - 1} more since the last report)" if skipped > 1 else ""
        logger.warning("training.non_finite_loss: %s; skipped that optimizer step%s", what, more)

    @staticmethod
    def mean_without_skipped(mean: float, steps: int, skipped: int, skipped_sum: float = 0.0) -> float:
        """A logged mean loss over `steps` optimizer steps, `skipped` of which added `skipped_sum` to its sum: the
        mean of the others."""
        return (mean * steps - skipped_sum) / (steps - skipped) if steps > skipped else float("nan")


class GuardSteps(TrainerCallback):
    """Tells the guard where each run begins (`NonFiniteGuard.reset`) and where each optimizer step ends
    (`NonFiniteGuard.step_end`)."""

    def __init__(self, guard: NonFiniteGuard):
        self.guard = guard

    def on_train_begin(self, args, state, control, **kwargs):
        self.guard.reset()

    def on_step_end(self, args, state, control, **kwargs):
        self.guard.step_end(state.global_step)
