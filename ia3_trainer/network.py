"""Can the Hugging Face Hub be reached? One short request, once per process, before anything is downloaded.

Without a network, huggingface_hub retries every request five times, waiting 1, 2, 4, 8 and 8 s, for each file:
loading a model by its Hub id printed retry lines for about 80 s before failing, and a Hub dataset about 25 s.
Code that downloads (the model, the tokenizer, a Hub dataset or `hf://` data file, a Hub adapter) asks
[`hub_unreachable`] first and, when the Hub cannot be reached, uses the local cache or fails at once with one line
([`OFFLINE_HINT`]). With `HF_HUB_OFFLINE=1` nothing is asked: the libraries read their caches only.
"""

from __future__ import annotations

import importlib
import logging
import socket

from .errors import first_line


logger = logging.getLogger(__name__)

OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use copies in the local cache without trying the network"
_answers: dict[str, str | None] = {}  # endpoint -> why it cannot be reached (None: it answered)


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` is set: huggingface_hub, transformers and datasets read only their caches."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached (one line, e.g. `cannot reach https://huggingface.co (ConnectError:
    ...)`), or None when it answers (any HTTP status) or offline mode is on.

    One HEAD request without retries, through huggingface_hub's own client (its proxies and certificates), with
    `HF_HUB_ETAG_TIMEOUT` (10 s by default) as its timeout; the answer is kept for the rest of the process.
    """
    from huggingface_hub import constants, get_session

    if hub_offline():
        return None
    endpoint = constants.ENDPOINT
    if endpoint not in _answers:
        try:
            get_session().head(endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)
            _answers[endpoint] = None
        except Exception as error:  # the client's own transport errors are no OSError
            if not is_network_error(error):
                raise
            _answers[endpoint] = f"cannot reach {endpoint} ({type(error).__name__}: {first_line(error)})"
            logger.info("%s", _answers[endpoint])
    return _answers[endpoint]


class NotCached(OSError):
    """The Hub cannot be reached and what was asked for is not in the local cache; the message says why."""


def load_or_cached(load, name: str):
    """`load()`; when `name` is not a local path and the Hub cannot be reached, `load(local_files_only=True)`
    instead, with a warning, so a cached copy loads at once rather than after minutes of retries. Raises
    [`NotCached`] (its message: why the Hub cannot be reached) when it is not in the cache."""
    from pathlib import Path

    unreachable = None if Path(name).expanduser().exists() else hub_unreachable()
    if unreachable is None:
        return load()
    try:
        loaded = load(local_files_only=True)
    except OSError:  # what transformers and huggingface_hub raise for a file that is not in the cache
        raise NotCached(unreachable) from None  # the chain is the cache miss the message already states
    logger.warning("%s; %s loaded from the local cache (%s)", unreachable, name, OFFLINE_HINT)
    return loaded


def offline_note() -> str:
    """What to add to a failure's message when HF_HUB_OFFLINE is set (the cause may be just that)."""
    return " (HF_HUB_OFFLINE is set)" if hub_offline() else ""


def is_network_error(error: BaseException) -> bool:
    """`error`, or an error it was raised from, is the network failing (no route, DNS, timeout, offline mode)."""
    kinds = (ConnectionError, TimeoutError, socket.gaierror, *_transport_errors())
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return True
        error = error.__cause__ or error.__context__
    return False


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of the HTTP client huggingface_hub uses (httpx2 now, httpx before)."""
    for name in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(name).TransportError,)
        except (ImportError, AttributeError):
            continue
    return ()
