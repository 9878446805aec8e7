"""A full disk: a save that cannot be written whole fails with one line and leaves what was there before as it was
(a file size limit, RLIMIT_FSIZE, stands for the full disk)."""

import json
import re
import resource
import signal
import subprocess
import sys

from test_runs import ENV, SAVES, snapshot, write  # the run-folder tests' recipes, environment and file hashes

from ia3_trainer.cli.main import main

from conftest import tiny_recipe


def limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


RESUME_PAST_THE_LIMIT = """
import json, resource, signal, sys
from ia3_trainer.cli.main import main

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
for recipe, limit in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(["train", recipe, "--resume", "--set", "training.max_steps=6", "--set",
                     "training.save_strategy=no"])
    except SystemExit as exit:
        code = exit.code
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    print(f"=== exit {code}", file=sys.stderr, flush=True)
"""


def test_a_full_disk_during_the_final_save_leaves_the_previous_adapter_whole(tmp_path, tiny_t5_dir, capsys):
    # The tiny base model is 400 kB and its tokenizer.json 32 kB; every other file of a save is under 20 kB. Both
    # runs resume in one process (imports are most of its time), each under its own file size limit.
    cases = {"base-model-too-large": ({"model.init": "random"}, 100_000),
             "tokenizer-too-large": ({"model.init": "pretrained", "model.name_or_path": str(tiny_t5_dir)}, 20_000)}
    before, runs = {}, []
    for name, (model, limit) in cases.items():
        (tmp_path / name).mkdir()
        path = write(tmp_path / name, tiny_recipe(tmp_path / name, **SAVES, **model))
        assert main(["train", path]) == 0
        before[name] = snapshot(tmp_path / name / "out")
        runs.append([path, limit])
    capsys.readouterr()

    result = subprocess.run([sys.executable, "-c", RESUME_PAST_THE_LIMIT, json.dumps(runs)], cwd=tmp_path, env=ENV,
                            text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = re.split(r"^=== exit (.*)\n", result.stderr, flags=re.MULTILINE)  # stderr, code, stderr, code, ""
    assert len(parts) == 2 * len(cases) + 1, result.stderr[-3000:]
    for name, stderr, code in zip(cases, parts[0:-1:2], parts[1::2], strict=True):
        out = tmp_path / name / "out"
        assert code == "2", (name, stderr[-3000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"ia3-trainer: error: could not save to {out}: ") and "File too large" in last, name
        assert last.endswith("what was there before is unchanged: free some disk space, then resume the run "
                             "(pass --resume)")
        assert "Traceback" not in stderr
        assert snapshot(out) == before[name], name  # the adapter, its base, recipe.json, inference.json, README.md
        assert not list(out.glob("tmp-*"))


WRITE_PAST_THE_LIMIT = """
import sys, torch
from ia3_trainer.training.checkpoints import saving
try:
    with saving(sys.argv[1]):
        torch.save(torch.zeros(10_000), sys.argv[1] + "/optimizer.pt")
except OSError as error:
    print(error)
"""


def test_a_write_failure_of_torch_save_is_one_oserror(tmp_path):
    # torch reports a failed write as a RuntimeError of its zip writer; a save must say what happened in one line.
    result = subprocess.run([sys.executable, "-c", WRITE_PAST_THE_LIMIT, str(tmp_path)], env=ENV, text=True,
                            capture_output=True, timeout=120, preexec_fn=limit_file_size(10_000))
    assert result.stdout.startswith(f"could not save to {tmp_path}: [enforce fail at inline_container.cc"), result
