"""The errors the package raises for what it is given, and the one way they become text: one line, with no secret.

Every problem with what a user gave (a recipe, its data, a run folder, a Hub repo, a file or argument) is an
[`IA3TrainerError`]; the command line prints those as one `ia3-trainer: error: ...` line (exit 2), and anything
else as a traceback, since it is a bug. Each subclass also derives from the builtin it used to be (`ValueError`,
`FileExistsError`, `ImportError`, ...), so an `except ValueError` written before keeps working. An error made from
fields (`key`, `problem`, `fix`) reads `<key>: <problem>; <fix>`, where `key` is the recipe key or the Python
argument to change; [`IA3TrainerError.describe`] lets the command line name its own flags instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping


class IA3TrainerError(Exception):
    """What the package was given cannot be used; the message says what to change.

    Raise it with the whole message, or with `key` (the recipe key or Python argument at fault), `problem` and
    `fix`, which the message is then built from: `<key>: <problem>; <fix>`.
    """

    def __init__(self, message: str | None = None, *, key: str | None = None, problem: str | None = None,
                 fix: str | None = None):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(self.describe() if message is None else message)

    def describe(self, names: Mapping[str, str] | None = None) -> str:
        """The message, with each Python name or phrase in `names` (in the key and the fix) said as `names` says it:
        the command line passes its flags, e.g. `{"overwrite=True": "--overwrite"}`."""
        if self.problem is None:
            return str(self)
        names = names or {}
        key, fix = self.key, self.fix
        if key is not None:
            key = names.get(key, key)
        if fix is not None:
            for python, said in names.items():
                fix = fix.replace(python, said)
        text = f"{self.problem}; {fix}" if fix else self.problem
        return f"{key}: {text}" if key else text


class RecipeError(IA3TrainerError, ValueError):
    """A recipe (a file, an override, or a `recipe.json` read from disk) is not usable; `errors` holds one line per
    problem.

    Each line reads `<where>: <dotted.key>: <problem>; <fix>`, where `<where>` is the recipe file, or `--set` for a
    value that came from an override.
    """

    def __init__(self, errors: str | list[str] | None = None, **fields):
        lines = None if errors is None else [errors] if isinstance(errors, str) else list(errors)
        super().__init__(None if lines is None else "\n".join(lines), **fields)
        self.errors = [str(self)] if lines is None else lines


class DataError(RecipeError):
    """The data a recipe points at cannot be used (no such file or split, a missing column, a label too long); the
    message names the `data.*` key to change."""


class InputError(IA3TrainerError, ValueError):
    """An argument given to a function or command (a file, a folder, a text, a number) cannot be used."""


class PathError(IA3TrainerError, OSError):
    """A file or folder given cannot be used: missing, of the wrong kind, unreadable, or holding something that
    must not be replaced."""


class RunFolderError(IA3TrainerError, FileExistsError):
    """A run's output folder cannot be used as asked: it holds another run or other files, another run holds it, it
    has no checkpoint to resume from, or a save into it failed."""


class HubError(IA3TrainerError, OSError):
    """The Hugging Face Hub refused or could not be reached, or a repo there holds no adapter."""


class MissingPackageError(IA3TrainerError, ImportError):
    """An optional package a recipe needs (rouge-score, sacrebleu, matplotlib, ...) is not installed."""


class NonFiniteLossError(IA3TrainerError, ArithmeticError):
    """Training met a NaN or infinite loss with `training.non_finite_loss` set to stop."""


class ProcessesDisagreeError(IA3TrainerError, RuntimeError):
    """The processes of a launch see different things (e.g. different checkpoints), so they cannot go on together."""


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
