"""The errors every module shares, and the one way they become text: one line, with no secret in it.

A [`RecipeError`] is a problem in a recipe (a file, an override, or a `recipe.json` read from disk) or in the data
it points at; each of its lines names the key to change. Misuse of the Python API is a `TypeError` or `ValueError`.
The command line prints any of them as one `ia3-trainer: error: ...` line, through [`redact`].
"""

from __future__ import annotations

import os
import re


class RecipeError(ValueError):
    """A recipe (or the data it points at) is not usable; `errors` holds one line per problem.

    Each line reads `<where>: <dotted.key>: <problem>; <fix>`, where `<where>` is the recipe file, or `--set` for a
    value that came from an override.
    """

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type name when the message is empty."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def one_line(error: BaseException, limit: int = 300) -> str:
    """`TypeName: message` on one line (whitespace squeezed), cut to `limit` characters."""
    return shorten(f"{type(error).__name__}: {error}", limit)


def shorten(text: str, limit: int = 300) -> str:
    """`text` with its whitespace squeezed to single spaces, cut to `limit` characters (ending in an ellipsis)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# What a token looks like where no variable names it: a Hub token, or whatever follows "Bearer" (an echoed
# Authorization header, as a line `Authorization: Bearer x` or in a repr `{'authorization': 'Bearer x'}`).
_TOKEN_PATTERNS = [
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9\-._~+/]{8,}=*"),  # RFC 6750 token characters; "bearer of" is prose
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
]
_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_SHORTEST_SECRET = 6  # a shorter "token" would turn every match of, say, "a" into ***


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every Hub token in it replaced by `***`: the ones given, the ones in `HF_TOKEN` and
    `HUGGING_FACE_HUB_TOKEN`, the one `hf auth login` saved, and anything after `Bearer` or shaped like `hf_...`.

    The one place secrets are taken out of text we print or log: server error bodies can echo request headers.
    """
    known = [*secrets, *(os.environ.get(name) for name in _TOKEN_VARIABLES), _saved_token()]
    known = {secret.strip() for secret in known if secret and len(secret.strip()) >= _SHORTEST_SECRET}
    for secret in sorted(known, key=len, reverse=True):  # a token that holds another is replaced whole
        text = text.replace(secret, "***")
    text = _TOKEN_PATTERNS[0].sub(r"\1***", text)
    return _TOKEN_PATTERNS[1].sub("hf_***", text)


def _saved_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no huggingface_hub, or an unreadable token file: there is no saved token to hide then
        return None
