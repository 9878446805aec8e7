"""The suite's own hermeticity: tests run in their tmp_path with known environment variables and leave the repo as
they found it (conftest's session check, run here mid-suite as well)."""

import os
from pathlib import Path

from conftest import REPO, changed_files, repo_files


def test_the_repo_is_unchanged_so_far(_repo_untouched):
    assert changed_files(_repo_untouched, repo_files()) == []


def test_the_check_sees_a_file_added_removed_or_modified(tmp_path):
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "gone.txt").write_text("b")
    (tmp_path / "edited.txt").write_text("c")
    (tmp_path / "__pycache__").mkdir()
    before = repo_files(tmp_path)
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "run.lock").write_text("")
    os.utime(tmp_path / "edited.txt", ns=(0, 0))
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"")  # bytecode is no change
    assert changed_files(before, repo_files(tmp_path)) == ["edited.txt", "gone.txt", os.path.join("new", "run.lock")]


def test_each_test_runs_in_its_own_folder_with_known_variables(tmp_path):
    assert Path.cwd() == tmp_path and REPO not in tmp_path.parents
    for variable in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "IA3_TRAINER_DEBUG", "IA3_TRAINER_HUB_TIMEOUT"):
        assert variable not in os.environ, variable
    assert str(REPO) in os.environ["PYTHONPATH"].split(os.pathsep)  # subprocesses import this checkout
