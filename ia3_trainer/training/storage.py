"""The Optuna storage a search's workers share: `journal:PATH` or an SQLAlchemy URL (SQLite by default), with the
heartbeat that fails and queues again the trial of a worker that died; and Optuna itself, an optional package."""

from __future__ import annotations

import time
import warnings

from ia3_trainer.errors import InputError, MissingPackageError, first_line, redact_urls


HEARTBEAT_S = 60  # how often a running trial tells an RDB storage it is alive
HEARTBEAT_GRACE_S = 180  # unheard of this long, it is failed and queued again


def require_optuna():
    """The `optuna` module, or a [`MissingPackageError`] naming the extra that installs it."""
    try:
        import optuna
    except ImportError as error:
        raise MissingPackageError('the search needs Optuna: pip install "ia3-trainer[search]"') from error
    return optuna


def open_storage(url: str, attempts: int = 5):
    """An Optuna storage for `url`: `journal:PATH` (a journal file) or an SQLAlchemy URL (with a heartbeat). Workers
    started together race to create a new database's tables; the loser tries again (up to `attempts` times)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            if url.startswith("journal:"):
                return JournalStorage(JournalFileBackend(url[len("journal:"):]))
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                    heartbeat_interval=HEARTBEAT_S, grace_period=HEARTBEAT_GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                )
        except Exception as error:  # SQLAlchemy's URL and driver errors, a missing driver, an unreadable file
            if isinstance(error, DBAPIError) and attempt + 1 < attempts:
                time.sleep(0.2 * (attempt + 1))  # another worker is creating the tables
                continue
            raise InputError(f"--storage {redact_urls(url)}: {first_line(error)}; give an SQLAlchemy URL "
                             "(sqlite:///path/study.db, postgresql://user@host/db) or journal:PATH") from error
