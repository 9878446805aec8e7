"""griffe extension: Hugging Face cross-references in docstrings, shown as code.

The house docstrings write [`~transformers.Seq2SeqTrainer`] and [`IA3TrainingArguments`] (Hugging Face's doc-builder
syntax, where `~` shows the last name only). Markdown would print the brackets; this shows `Seq2SeqTrainer`.
"""

from __future__ import annotations

import re

import griffe


REFERENCE = re.compile(r"\[`(~?)([\w.]+)`\](?![(\[])")


class HFCrossReferences(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = REFERENCE.sub(_shown, obj.docstring.value)


def _shown(match: re.Match) -> str:
    name = match.group(2).rsplit(".", 1)[-1] if match.group(1) else match.group(2)
    return f"`{name}`"
