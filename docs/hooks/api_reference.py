"""mkdocs hook: the API page documents every name `ia3_trainer` exports, so a new export cannot be left out.

On a page holding `<!-- api-errors -->`, that line becomes a `::: ia3_trainer.NAME` block for every exception class
in `ia3_trainer.__all__`; `<!-- api-other -->` becomes one for every other exported name the page does not already
show (under an "Other exports" heading, when there is any).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
ERRORS = "<!-- api-errors -->"
OTHER = "<!-- api-other -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if ERRORS not in markdown and OTHER not in markdown:
        return markdown
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import ia3_trainer

    names = [name for name in ia3_trainer.__all__ if not name.startswith("__")]
    errors = [name for name in names if _is_exception(getattr(ia3_trainer, name))]
    shown = set(re.findall(r"^::: ia3_trainer\.(\w+)", markdown, flags=re.MULTILINE)) | set(errors)
    other = [name for name in names if name not in shown]
    markdown = markdown.replace(ERRORS, _blocks(errors))
    return markdown.replace(OTHER, ("## Other exports\n\n" + _blocks(other)) if other else "")


def _is_exception(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)


def _blocks(names: list[str]) -> str:
    return "".join(f"::: ia3_trainer.{name}\n\n" for name in names)
