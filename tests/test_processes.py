"""Under a launcher, which process speaks (`ia3_trainer.processes`): the first process of each machine prints the
warnings, the others only errors; and a launch that asked for several processes but got one says so in one line.

The environments are what accelerate 1.16 gives its processes (printed from a launched script). The 2-process
launches that count a warning (once) and an error (twice):
`test_search.py::test_under_accelerate_launch_one_trial_is_one_distributed_run` and
`test_runs.py::test_every_process_of_a_launch_stops_with_the_same_line_when_the_folder_is_taken`.
"""

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from ia3_trainer.processes import (
    QUIET,
    is_local_main_process,
    is_main_process,
    quiet_other_processes,
    single_process_note,
)

from conftest import free_port, tiny_recipe


ACCELERATE = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}
# accelerate launch --cpu --num_processes 2: its simple launcher, one process
SIMPLE_TWO = {**ACCELERATE, "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SIMPLE_ONE = {**ACCELERATE, "ACCELERATE_USE_CPU": "True"}  # --num_processes 1
# accelerate launch --multi_gpu --num_processes 2 (torchrun): the second process
TORCHRUN = {**ACCELERATE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "1", "LOCAL_RANK": "1",
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
MPIRUN = {**SIMPLE_TWO, "PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}  # --cpu --mpirun_hostfile


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


def test_a_launch_that_got_one_process_of_several_says_so():
    note = single_process_note(SIMPLE_TWO)
    assert note.startswith("ia3-trainer: accelerate launch started 1 process, not --num_processes")
    assert "\n" not in note
    assert "--multi_gpu --num_processes N" in note
    for environ in ({}, SIMPLE_ONE, TORCHRUN, MPIRUN, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}):
        assert single_process_note(environ) is None, environ


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


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_says_it_runs_one(tmp_path):
    # accelerate 1.16 starts one process for --cpu --num_processes 2 (its simple launcher; see above). The line comes
    # before the recipe is read: here a bad --set stops the run right after it, before any library loads.
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(tmp_path)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "ia3_trainer", "train", str(recipe),
               "--set", "training.learning_rate=-1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    # accelerate then repeats the failed process's stderr in its own traceback, after these two lines.
    assert result.stderr.splitlines()[:2] == [
        single_process_note(SIMPLE_TWO), "ia3-trainer: error: --set: training.learning_rate: must be > 0, got -1"
    ], result.stderr[-3000:]
