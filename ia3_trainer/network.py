"""Can the Hugging Face Hub be reached? One short request, once per process, before anything is downloaded; and a
timeout on every request huggingface_hub's shared client sends (`IA3_TRAINER_HUB_TIMEOUT`, [`bound_hub_requests`]).

Without a network, huggingface_hub retries every request five times, waiting 1, 2, 4, 8 and 8 s, for each file:
loading a model by its Hub id printed retry lines for about 80 s before failing, and a Hub dataset about 25 s.
Code that downloads (the model, the tokenizer, a Hub dataset or `hf://` data file, a Hub adapter) asks
[`hub_unreachable`] first and, when the Hub cannot be reached, uses the local cache or fails at once with one line
([`OFFLINE_HINT`]). With `HF_HUB_OFFLINE=1` nothing is asked: the libraries read their caches only.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import socket
import threading

from ia3_trainer.errors import InputError, first_line


logger = logging.getLogger(__name__)

TIMEOUT_VARIABLE = "IA3_TRAINER_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
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
    bound_hub_requests(request_timeout())  # every later request of huggingface_hub's client has a timeout
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


def request_timeout(timeout: float | None = None) -> float:
    """Seconds each Hub request may take to connect, and each read or write of it to make progress: `timeout`, else
    `IA3_TRAINER_HUB_TIMEOUT`, else 60. A slow upload that keeps moving is not cut."""
    where = "timeout"
    if timeout is None:
        text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        where = TIMEOUT_VARIABLE
        try:
            timeout = float(text)
        except ValueError:
            raise InputError(f"{TIMEOUT_VARIABLE}: expected a number of seconds such as 60, got {text!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise InputError(f"{where}: expected a number of seconds above 0, such as 60, got {timeout!r}")
    return float(timeout)


class _BoundedClientFactory:
    """Builds huggingface_hub's shared HTTP client with the installed factory, then gives it `timeout` unless that
    factory already set one, and gives the same bound to each request that passes `timeout=None` itself
    (huggingface_hub's `repo_info`, which `snapshot_download` sends first, does: the client's bound alone left
    an adapter download waiting for ever)."""

    def __init__(self, base, timeout: float):
        self.base, self.timeout = base, timeout

    def __call__(self):
        client = self.base()
        bounds = client.timeout
        if all(getattr(bounds, name, None) is None for name in ("connect", "read", "write", "pool")):
            client.timeout = self.timeout  # httpx turns a number into the same bound for each phase
        hooks = client.event_hooks  # httpx's public hooks: called with each request before it is sent
        hooks["request"] = [*hooks.get("request", []), self._bound_request]
        client.event_hooks = hooks
        return client

    def _bound_request(self, request) -> None:
        phases = request.extensions.get("timeout")
        if isinstance(phases, dict) and None in phases.values():
            request.extensions["timeout"] = {
                phase: self.timeout if seconds is None else seconds for phase, seconds in phases.items()}


_FACTORY_LOCK = threading.Lock()


def bound_hub_requests(timeout: float) -> None:
    """Give every request huggingface_hub sends through its shared HTTP client a timeout of `timeout` seconds.

    huggingface_hub 2.4 builds that client with `timeout=None` (some 1.x releases with 10 s) and sends
    `create_repo`, the README check, `preupload`, the LFS calls and `commit` without a timeout of their own: a Hub
    that accepts the connection and never answers blocked a push for ever. This wraps the installed client factory
    (`set_client_factory`; a client someone configured with a timeout keeps it), so a client huggingface_hub builds
    again after a connection error is bounded too. Downloads that pass their own timeout are unaffected. Uploads
    through Xet (`hf_xet`) use that package's own network code and timeouts. It stays installed for the rest of the
    process: `set_client_factory` closes the shared client, so switching it around each call of ours would cut the
    requests other threads have in flight (a push in the background, the user's own calls).
    """
    import huggingface_hub
    from huggingface_hub.utils import _http  # the installed factory has no public getter (1.x and 2.x)

    with _FACTORY_LOCK:
        installed = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or getattr(_http, "default_client_factory", None)
        if installed is None:  # a huggingface_hub without these internals: bound the client it has now
            _BoundedClientFactory(huggingface_hub.get_session, timeout)()
            return
        if isinstance(installed, _BoundedClientFactory) and installed.timeout == timeout:
            return
        base = installed.base if isinstance(installed, _BoundedClientFactory) else installed
        huggingface_hub.set_client_factory(_BoundedClientFactory(base, timeout))


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
