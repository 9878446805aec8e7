"""mkdocs hook: render the command-line reference from the CLI's own `--help`, so it cannot drift.

A page that holds the line `<!-- cli-reference -->` gets, in its place, `ia3-trainer --help` and the `--help` of
every command it lists, each run as `python -m ia3_trainer ... --help` on the repository's own package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


MARKER = "<!-- cli-reference -->"
ROOT = Path(__file__).resolve().parents[2]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


def render() -> str:
    top = _help()
    # argparse lists the commands under "COMMAND", each indented by four spaces
    commands = re.findall(r"^ {4}(\S+)", top.split("options:")[0], flags=re.MULTILINE)
    out = ["## `ia3-trainer`", "", "```text", top.rstrip(), "```", ""]
    for command in commands:
        out += [f"## `ia3-trainer {command}`", "", "```text", _help(command).rstrip(), "```", ""]
    return "\n".join(out)


def _help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "PYTHON_COLORS": "0", "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run([sys.executable, "-m", "ia3_trainer", *command, "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"ia3-trainer {' '.join(command)} --help failed: {done.stderr.strip()}")
    return done.stdout
