"""Which process of a launch this one is, and what it says.

Under `accelerate launch`, torchrun or mpirun every process runs the same command, so a warning each process prints
appears once per process. The first process of each machine (local rank 0) speaks for its machine: on the others
[`quiet_other_processes`] keeps warnings and notices (ours and the libraries') to errors, as transformers does with
`log_level_replica`. Errors still print on every process: each may have its own. The lines about the run itself (the
summary, "Resuming from") print on the main process only: the trainer's `is_world_process_zero()`, or
[`is_main_process`] where there is no trainer yet.

Everything here reads the launcher's environment variables (the names accelerate reads), so it works before any
library is imported, and the libraries read what it sets when they start.
"""

from __future__ import annotations

import logging
import os
import warnings


RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

# What the other processes of a launch set for the libraries before they load, unless the user set it: their
# warnings to errors only (torch's C++ warnings too, e.g. DDP's unused-parameter one), and no progress bars.
QUIET = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def _launcher_number(names: tuple[str, ...], environ) -> int | None:
    """The first of the variables `names` that is set, as a number (None when none is; a value that is no number
    counts as 0: `check_launcher_environment` refuses it with one line)."""
    for name in names:
        if name in environ:
            value = environ[name].strip()
            return int(value) if value.lstrip("-").isdigit() else 0
    return None


def is_main_process(environ=None) -> bool:
    """Whether this is the main process of the run (global rank 0, as without a launcher)."""
    return not _launcher_number(RANK_VARIABLES, os.environ if environ is None else environ)


def is_local_main_process(environ=None) -> bool:
    """Whether this is the first process of its machine (local rank 0, as without a launcher)."""
    return not _launcher_number(LOCAL_RANK_VARIABLES, os.environ if environ is None else environ)


def quiet_other_processes(environ=None) -> bool:
    """On a process that is not the first of its machine: errors only from our loggers, the libraries' loggers and
    torch's C++ side (`QUIET`), no Python warnings and no progress bars. Call it before torch, transformers and
    datasets are imported: they read their levels from the environment when they load (the trainer then keeps
    them: `IA3TrainingArguments.log_level_replica` is `"passive"`). Returns whether it quieted this process."""
    environ = os.environ if environ is None else environ
    if is_local_main_process(environ):
        return False
    for name, value in QUIET.items():
        environ.setdefault(name, value)
    logging.getLogger().setLevel(logging.ERROR)  # every logger that sets no level of its own: ours, accelerate's
    warnings.simplefilter("ignore")
    return True


def single_process_note(environ=None) -> str | None:
    """The line that says `accelerate launch` started one process where several were asked for, else None.

    Without `--multi_gpu` (or a config file that sets it), `accelerate launch --cpu --num_processes 2` runs its
    simple launcher, which starts one process: several CPU processes need mpirun there. That launcher alone sets
    `ACCELERATE_USE_CPU`, and it sets `MASTER_ADDR` only when more than one process or machine was asked for;
    torchrun and mpirun set the rank and world size, which it does not."""
    environ = os.environ if environ is None else environ
    if "ACCELERATE_USE_CPU" not in environ or "MASTER_ADDR" not in environ:
        return None
    if any(name in environ for name in (*RANK_VARIABLES, *LOCAL_RANK_VARIABLES, *WORLD_SIZE_VARIABLES)):
        return None
    return ("ia3-trainer: accelerate launch started 1 process, not --num_processes: without --multi_gpu it starts "
            "one (several CPU processes need mpirun); for N processes run accelerate launch --multi_gpu "
            "--num_processes N, without --cpu (set training.use_cpu: true on a machine without GPUs)")
