"""Where studies and runs are stored: checking URLs, opening Optuna storage, first-time creation.

Everything here runs before anything is written, or serialises the one step that races when
many workers start at once on a fresh backend: creating a database schema (Optuna's or MLflow's)
and the study in it. The embedded SQLite default is serialised with a lock file next to the
database; PostgreSQL with its own session-level advisory lock, so it holds across machines.
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from filelock import FileLock
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from melvae.errors import InputError
from melvae.study.recovery import on_stale_trial

# A worker beats every HEARTBEAT_SECONDS; a trial silent for GRACE_BEATS beats is failed (and
# retried) by whichever worker starts a trial next: a dead worker's trial within about a minute.
HEARTBEAT_SECONDS = 10
GRACE_BEATS = 3
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql")
_SQLITE_BUSY_SECONDS = 60
_CONNECT_SECONDS = 10
_ADVISORY_LOCK_KEY = 0x6D656C766165  # "melvae": one key for every melvae creation step


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***, fit to print or log."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def check_storage_url(url: str) -> None:
    """Raise InputError unless `url` is an Optuna RDB storage one can reach; writes nothing."""
    _check_database(url, what="Optuna storage", option="--storage")


def check_tracking_uri(uri: str) -> None:
    """Raise InputError unless the MLflow tracking URI is usable: a database that can be reached,
    an MLflow server that answers, or a local path; writes nothing."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme.split("+")[0] in DATABASE_SCHEMES:
        _check_database(uri, what="MLflow tracking backend", option="--tracking-uri")
    elif scheme not in ("", "file"):
        raise InputError(
            f"unsupported MLflow tracking URI scheme {scheme!r}: {redact_url(uri)}",
            where="--tracking-uri",
            fix="use http://HOST:PORT of an `mlflow server`, a database URL "
            "(sqlite:///path/mlflow.db, postgresql+psycopg://user@host/db) or a folder",
        )


def sqlite_file_missing(url: str) -> bool:
    """True for a SQLite URL whose database file does not exist (opening it would create it)."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        return False
    return not Path(url.removeprefix("sqlite:///")).is_file()


def open_storage(url: str, *, heartbeat: int = HEARTBEAT_SECONDS) -> optuna.storages.RDBStorage:
    """Optuna RDB storage with heartbeats: a dead worker's trial is failed and retried."""
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Workers sharing one file wait for each other's writes instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": _SQLITE_BUSY_SECONDS}}
    with warnings.catch_warnings():
        # Optuna flags heartbeats as experimental; they are what makes crash recovery work.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=GRACE_BEATS * heartbeat,
                heartbeat_stale_trial_callback=on_stale_trial,
            )
        except SQLAlchemyError as exc:
            raise _unusable(url, "Optuna storage", "--storage", exc) from None


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Give the running `trial` every user attribute in `attrs` in one storage transaction.

    `trial.set_user_attr` commits once per attribute, and each commit of the study's SQLite file
    waits for the disk (fsync) and holds the file's write lock, which the other workers wait
    for: the ~18 a default-study trial sets at its end took 0.4 s wall of each trial (22 ms
    apiece, bench/study_overheads.py). Here they are written the way Optuna writes each one
    (its RDB storage's own statement, Optuna 5.1), all or none, with one commit, for a trial of
    an Optuna RDB storage (SQLite, PostgreSQL, MySQL: `open_storage`, the only kind `run` and
    `tune` open). Any other storage, or an Optuna whose RDB storage lacks those internals, gets
    them one `set_user_attr` at a time: the same attributes, more commits.

    Parameters
    ----------
    trial
        A running trial of a study on `open_storage`'s storage.
    attrs
        Attribute name -> JSON-serialisable value, as `trial.set_user_attr` takes them.
    """
    storage = getattr(trial.storage, "_backend", trial.storage)  # Optuna wraps it in a cache
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        one_commit = (
            isinstance(storage, optuna.storages.RDBStorage)
            and hasattr(storage, "_set_trial_attr_without_commit")
            and hasattr(trial, "_cached_frozen_trial")
        )
    except ImportError:
        one_commit = False
    if not one_commit:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    with _create_scoped_session(storage.scoped_session, True) as session:
        for key, value in attrs.items():
            storage._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial._trial_id, key, value
            )
    trial._cached_frozen_trial.user_attrs.update(attrs)  # `trial.user_attrs`, as Optuna keeps it


@contextlib.contextmanager
def first_time_lock(url: str) -> Iterator[None]:
    """Hold a lock shared by every worker on this database while its schema/study is created.

    SQLite: a lock file beside the database file (one machine, as SQLite itself requires).
    PostgreSQL: a session-level advisory lock, held by every machine's workers alike.
    Other backends: no lock (their own transactions decide).
    """
    with _database_lock(url, suffix=".lock", key=_ADVISORY_LOCK_KEY):
        yield


@contextlib.contextmanager
def promotion_lock(url: str) -> Iterator[None]:
    """Serialise registering and promoting on one MLflow backend (its own lock, as above).

    Comparing with the champion and moving the alias is one read-then-write: without the lock
    two promotions at the same moment could both win, or a worse one overwrite a better one.
    An MLflow server (http) cannot be locked from here: its promotions are not serialised.
    """
    with _database_lock(url, suffix=".promote.lock", key=_ADVISORY_LOCK_KEY + 1):
        yield


@contextlib.contextmanager
def _database_lock(url: str, *, suffix: str, key: int) -> Iterator[None]:
    scheme = urllib.parse.urlsplit(url).scheme.split("+")[0]
    if scheme == "sqlite" and url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}{suffix}"):
            yield
    elif scheme == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                lock = sqlalchemy.text("SELECT pg_advisory_lock(:key)")
                connection.execute(lock, {"key": key})
                connection.commit()
                yield
        finally:
            # Closing the session releases the advisory lock.
            engine.dispose()
    else:
        yield


def _check_database(url: str, *, what: str, option: str) -> None:
    shown = redact_url(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except ArgumentError:
        raise InputError(
            f"{what} URL is malformed: {shown}",
            where=option,
            fix="write it as sqlite:///path/to/file.db or postgresql://user:password@host:port/db",
        ) from None
    if parsed.get_backend_name() not in DATABASE_SCHEMES:
        raise InputError(
            f"{what} URL names an unsupported database {parsed.get_backend_name()!r}: {shown}",
            where=option,
            fix=f"use one of {', '.join(DATABASE_SCHEMES)} (e.g. sqlite:///mlruns/optuna.db)",
        )
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(parsed.database, shown, option)
        return
    try:
        engine = sqlalchemy.create_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": _CONNECT_SECONDS}
        )
        with engine.connect():
            pass
        engine.dispose()
    except (ImportError, NoSuchModuleError) as exc:
        raise InputError(
            f"no database driver for {shown}: {exc}",
            where=option,
            fix='install it, e.g. pip install -e ".[postgres]"',
        ) from None
    except SQLAlchemyError as exc:
        raise _unusable(url, what, option, exc) from None


def _check_sqlite_path(database: str | None, shown: str, option: str) -> None:
    if not database or database == ":memory:":
        raise InputError(
            f"{shown} is not a file: workers and later runs could not share it",
            where=option,
            fix="give a file, e.g. sqlite:///mlruns/optuna.db",
        )
    folder = Path(database).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(
            f"{shown} lies under {folder}, which is a file, not a folder",
            where=option,
            fix="give a path whose folders can be created",
        )


def _check_server(uri: str) -> None:
    shown = redact_url(uri)
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=_CONNECT_SECONDS):
            return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(
            f"no MLflow server answers at {shown}: {reason}",
            where="--tracking-uri",
            fix="start it (mlflow server --host HOST --port PORT ...) and check host and port, "
            "or leave --tracking-uri out to use the local mlruns/mlflow.db",
        ) from None


def _unusable(url: str, what: str, option: str, exc: Exception) -> InputError:
    password = urllib.parse.urlsplit(url).password
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if password:
        reason = reason.replace(password, "***")
    return InputError(
        f"cannot use the {what} at {redact_url(url)}: {reason}",
        where=option,
        fix="check that the server runs, and the host, port, user, password and database name",
    )
