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
    return redact_urls(_TOKEN_PATTERNS[1].sub("hf_***", text))


# A URL in text (up to whitespace or a quote), and the query or fragment parameter names that carry a credential:
# `token`, `access_token`, `api_key`, `sig` (Azure SAS), `X-Amz-Signature`, `X-Amz-Credential`, `password`, ...
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_SECRET_PARAM = re.compile(r"(?i)token|key|sig|password|passwd|pwd|secret|credential|auth|session")


def redact_urls(value):
    """`value` with the credentials taken out of every URL in it: the user info (`user:password@`) becomes `***@`,
    and the value of each query or fragment parameter whose name looks like a credential becomes `***`.

    `value` is a string (every URL in it is redacted) or JSON data (a `dict`, `list` or `tuple`, redacted string by
    string; keys are kept). This is what a run saves (`recipe.json`, `run.json`, the model card) and what a push
    uploads, so that they say where the data came from without the secret; the recipe file itself is never changed.

    Example:

    >>> redact_urls("https://ann:pw@example.com/train.jsonl?token=abc&split=train")
    'https://***@example.com/train.jsonl?token=***&split=train'
    """
    if isinstance(value, str):
        return _URL.sub(lambda match: "::".join(_redact_url(part) for part in match.group(0).split("::")), value)
    if isinstance(value, dict):
        return {key: redact_urls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_urls(item) for item in value)
    return value


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{re.sub(r'([?#&;])([^=&#;]*)=([^&#;]*)', _redact_param, tail)}"


def _redact_param(match: re.Match) -> str:
    start, name, value = match.groups()
    return f"{start}{name}={'***' if value and _SECRET_PARAM.search(name) else value}"


def _saved_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no huggingface_hub, or an unreadable token file: there is no saved token to hide then
        return None
