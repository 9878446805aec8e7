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

