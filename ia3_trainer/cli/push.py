"""`ia3-trainer push`: push a finished run's adapter to the Hugging Face Hub; the folder is only read."""

from __future__ import annotations

import sys

from ia3_trainer.errors import InputError, PathError, redact
from ia3_trainer.jsonfiles import read_json
from ia3_trainer.recipe.loading import load_saved_recipe


def push_command(output_dir: str, repo_id: str, private: bool) -> int:
    from pathlib import Path

    from ia3_trainer.hub.upload import push_adapter_folder
    from ia3_trainer.network import request_timeout
    from ia3_trainer.recipe.loading import check_repo_id

    folder = Path(output_dir)
    problem = check_repo_id(repo_id)  # a malformed id, told apart from the Hub's own refusals (HTTP 400) below
    if problem:
        raise InputError(key="REPO_ID", problem=problem)
    timeout = request_timeout()  # a bad IA3_TRAINER_HUB_TIMEOUT is said as such, not as a network problem
    if not (folder / "adapter_config.json").is_file():
        raise PathError(key="OUTPUT_DIR", problem=f"{folder} holds no adapter_config.json",
                        fix="pass the output_dir of a finished run")
    load_saved_recipe(folder)  # the card reads recipe.json: a bad one fails here, in one line
    results = folder / "all_results.json"
    metrics = read_json(results, allow_nan=True) if results.is_file() else None
    # push_adapter_folder uploads a staged copy (with the card and metrics.json) and removes it whatever happens:
    # the folder is only read. What the Hub or the network refuses is a HubError, said in one line.
    try:
        commit = push_adapter_folder(folder, repo_id, private=private, metrics=metrics,
                                     commit_message="Upload adapter", timeout=timeout)
    except KeyboardInterrupt:
        print(redact(f"ia3-trainer: interrupted: the push to {repo_id} did not finish; {folder} is unchanged; run the "
                     "same command again to push it"), file=sys.stderr)
        raise SystemExit(130) from None
    print(f"Pushed {folder} to {commit.commit_url}")
    return 0
