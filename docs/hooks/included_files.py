"""mkdocs hook: pages that show a file of the repository root (CONTRIBUTING.md, CHANGELOG.md), so it has one copy.

A page line `<!-- include FILE -->` becomes FILE's text without its title. Links in those files point to
`docs/<page>.md` (right on GitHub, from the repository root); inside the site the same page is `<page>.md`.
"""

from __future__ import annotations

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
INCLUDE = re.compile(r"^<!-- include (\S+) -->$", flags=re.MULTILINE)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return INCLUDE.sub(lambda match: _included(match.group(1)), markdown)


def _included(name: str) -> str:
    text = (ROOT / name).read_text(encoding="utf-8")
    if text.startswith("# "):
        text = text.split("\n", 1)[1]
    return text.replace("](docs/", "](")
