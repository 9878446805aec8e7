"""CPU threads for training and evaluation: a small model on the CPU runs on one intra-op thread unless the user
chose a number.

A small model's matrices are too small for a second thread to help, and on a busy machine OpenMP threads spin-wait
for one another: with one other CPU-bound process per core, the tiny recipe took 5 to 15 times longer on two threads
than on one. A user's choice always wins: `OMP_NUM_THREADS` (or `MKL_NUM_THREADS`) in the environment, or a
`torch.set_num_threads(n)` made before the run (seen as a thread count other than torch's default).
"""

import contextlib
import os
from pathlib import Path


# Below this many parameters one thread is used. A training step (batch 16 x 64 tokens) of T5s of 0.02M, 1.9M, 16M
# and 61M parameters on a 2-core machine with other work running took 0.13/0.38/1.1/3.4 s on one thread and
# 1.1/4.1/9.0/13 s on two; on an idle machine a second thread can only help the larger of these (t5-small's 60M
# and up), so they keep torch's default.
SMALL_MODEL_PARAMETERS = 20_000_000
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def default_threads() -> set[int]:
    """The intra-op thread counts torch may pick by itself on this machine: its usable physical cores (its usual
    default) and its usable logical CPUs."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return {len(cpus), len(cores)}


def user_chose_threads() -> bool:
    """Whether the user set the intra-op thread count: a thread variable in the environment, or a count other than
    the ones torch picks by itself."""
    import torch

    return any(os.environ.get(name) for name in THREAD_VARIABLES) or torch.get_num_threads() not in default_threads()


def parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@contextlib.contextmanager
def cpu_threads(model, device):
    """Run the block on one intra-op thread when `model` is small (fewer than `SMALL_MODEL_PARAMETERS` parameters),
    runs on the CPU (`device`, a `torch.device` or its type) and the user chose no thread count; restore the count
    after. Otherwise change nothing."""
    import torch

    device_type = getattr(device, "type", device)
    if device_type != "cpu" or torch.get_num_threads() == 1 or user_chose_threads():
        yield
        return
    if parameter_count(model) >= SMALL_MODEL_PARAMETERS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
