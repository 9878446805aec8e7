"""Under a launcher, which process speaks (`ia3_trainer.processes`): the first process of each machine prints the
warnings, the others only errors.

The environments are what accelerate 1.16 gives its processes (printed from a launched script). The 2-process
launches that count a warning (once) and an error (twice):
`test_search.py::test_under_accelerate_launch_one_trial_is_one_distributed_run` and
`test_runs.py::test_every_process_of_a_launch_stops_with_the_same_line_when_the_folder_is_taken`.
"""

import logging
import warnings

import pytest

from ia3_trainer.processes import (
    QUIET,
    is_local_main_process,
    is_main_process,
    quiet_other_processes,
)


ACCELERATE = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}
# accelerate launch --cpu --num_processes 2: its simple launcher, one process
SIMPLE_TWO = {**ACCELERATE, "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
# accelerate launch --multi_gpu --num_processes 2 (torchrun): the second process
TORCHRUN = {**ACCELERATE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "1", "LOCAL_RANK": "1",
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.parametrize(("environ", "main", "local_main"), [
    ({}, True, True),
    (SIMPLE_TWO, True, True),
    (TORCHRUN, False, False),
    ({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0"}, True, True),
    ({**TORCHRUN, "RANK": "2", "LOCAL_RANK": "0"}, False, True),  # machine 1's first process
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, False, False),
])
def test_which_process_speaks(environ, main, local_main):
    assert is_main_process(environ) is main
    assert is_local_main_process(environ) is local_main


def test_only_the_first_process_of_a_machine_prints_warnings():
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        try:
            first = {"LOCAL_RANK": "0", "RANK": "2"}
            assert not quiet_other_processes(first) and first == {"LOCAL_RANK": "0", "RANK": "2"}
            assert root.level == level
            other = {"LOCAL_RANK": "1", "RANK": "3", "TRANSFORMERS_VERBOSITY": "info"}  # the user's choice stays
            assert quiet_other_processes(other)
            assert other == {**QUIET, **other, "TRANSFORMERS_VERBOSITY": "info"}
            assert other["TORCH_CPP_LOG_LEVEL"] == "ERROR" and other["DATASETS_VERBOSITY"] == "error"
            assert root.level == logging.ERROR
            assert not logging.getLogger("ia3_trainer.data").isEnabledFor(logging.WARNING)
            assert logging.getLogger("ia3_trainer.data").isEnabledFor(logging.ERROR)  # errors still print
            with warnings.catch_warnings(record=True) as caught:
                warnings.warn("said by every process", UserWarning, stacklevel=1)
            assert caught == []
        finally:
            root.setLevel(level)

