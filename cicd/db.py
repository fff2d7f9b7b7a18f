"""Database engine and sessions, created on first use and never at import time.

A process's entry point calls :func:`configure` with its settings (the web's
``create_app``, the worker at start, the CLI); nothing here reads the
environment. Each process (gunicorn worker, Celery pool child) builds its own
engine: a connection pool must not cross a ``fork``. :func:`reset` is called
after a fork.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cicd.config import Settings
from cicd.errors import ConfigError
from cicd.models import utcnow

__all__ = [
    "configure", "engine", "session", "clock", "login", "retrying", "retry_conflicts", "reset",
    "migrate",
]  # fmt: skip

log = logging.getLogger(__name__)
T = TypeVar("T")
_url: str | None = None


def configure(settings: Settings) -> None:
    """Use ``settings.database_url`` from now on (a new URL drops the old engine)."""
    global _url
    settings.require("database_url")
    if settings.database_url != _url:
        reset()
        _url = settings.database_url


@functools.cache
def engine() -> Engine:
    """The process's engine; ``pool_pre_ping`` survives a database restart."""
    url = _url
    if url is None:
        raise ConfigError("the database is not configured: the process must call db.configure()")
    options: dict = {"pool_pre_ping": True}
    if url.startswith(("mysql", "mariadb")):
        # As many pooled connections as a gunicorn worker has threads (8) and more:
        # a connection closed and reopened per request costs PyMySQL ~20 ms of CPU.
        options.update(pool_recycle=3600, pool_size=10, max_overflow=20)
        # A database that is down must fail a request in seconds (the webhook then
        # answers 503 while GitLab still waits), not hang it.
        options["connect_args"] = {"connect_timeout": 3, "read_timeout": 60, "write_timeout": 60}
    if url.startswith("sqlite"):
        # Web threads, workers and their pool processes all write: wait for the lock.
        options["connect_args"] = {"timeout": 30}
    created = create_engine(url, **options)
    if url.startswith("sqlite"):
        event.listen(created, "connect", _sqlite_pragmas)
    return created


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets readers go on while a writer writes; foreign keys as in MySQL."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@functools.cache
def _sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(engine(), expire_on_commit=False)


@contextmanager
def session() -> Iterator[Session]:
    """A session that rolls back on error; callers commit explicitly."""
    with _sessionmaker()() as db:
        try:
            yield db
        except BaseException:
            db.rollback()
            raise


#: The database server's "now" in UTC, per dialect (SQLite's is this host's: it has no other).
_NOW_IN_UTC = {"mysql": "SELECT UTC_TIMESTAMP(6)", "mariadb": "SELECT UTC_TIMESTAMP(6)",
               "postgresql": "SELECT timezone('UTC', now())"}  # fmt: skip


def clock(db: Session) -> dt.datetime:
    """Now on the database's clock (UTC, naive, like every timestamp column).

    Heartbeats are written and aged with it, so that no host's wall clock is
    compared with another's: agents, the web and the reaper run on hosts of
    their own, whose clocks may disagree by more than the offline bound.
    """
    query = _NOW_IN_UTC.get(db.get_bind().dialect.name)
    if query is None:
        return utcnow()
    now = db.execute(text(query)).scalar_one()
    return now.replace(tzinfo=None) if now.tzinfo else now


#: The account this session logged in as, per dialect (SQLite has no accounts).
_LOGIN = {"mysql": "SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1)",
          "mariadb": "SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1)",
          "postgresql": "SELECT current_user"}  # fmt: skip


def login(db: Session) -> str | None:
    """The database account this session is logged in as, as the server knows it.

    An agent's identity is its account (:mod:`cicd.agents`): the server
    authenticated it, so no node can claim another's by saying so.
    """
    query = _LOGIN.get(db.get_bind().dialect.name)
    return db.execute(text(query)).scalar_one() if query else None


def retrying(operation: Callable[[], T], what: str, give_up_after: float = 120) -> T:
    """Run ``operation``, retrying while the database is unreachable (a restart, a failover).

    For writes that must not be lost, such as a build's state or log: the
    caller waits out a short outage instead of dropping the write. Errors that
    are not about the connection are raised at once.
    """
    started, delay = time.monotonic(), 0.2
    while True:
        try:
            return operation()
        except (OperationalError, InterfaceError) as error:
            if time.monotonic() - started + delay > give_up_after:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1fs", what, error.orig, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


#: MySQL/MariaDB errors that mean two transactions collided, not that the database is
#: down: a deadlock (InnoDB rolled this one back) and a lock wait timeout.
CONFLICTS = frozenset({1205, 1213})


def retry_conflicts(operation: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Run ``operation`` (one whole transaction) again when it lost a lock conflict.

    InnoDB picks a victim when, say, a webhook's insert and an auto-cancel's
    range update wait on each other, and asks it to "try restarting
    transaction"; that is a normal answer under concurrency, not an outage, so
    the caller should not see it. Anything else, and the last conflict, is raised.
    """
    attempt = 1
    while True:
        try:
            return operation()
        except OperationalError as error:
            code = error.orig.args[0] if error.orig is not None and error.orig.args else None
            if code not in CONFLICTS or attempt >= attempts:
                raise
            log.info("%s: %s; running it again", what, error.orig)
            time.sleep(random.uniform(0, 0.02 * attempt))  # noqa: S311 (jitter, not a secret)
            attempt += 1


def reset() -> None:
    """Forget the engine of the parent process after a fork, without closing its sockets."""
    if engine.cache_info().currsize:
        engine().dispose(close=False)
    engine.cache_clear()
    _sessionmaker.cache_clear()


def migrate() -> tuple[str | None, str]:
    """Create or upgrade the schema to the newest migration (:mod:`cicd.migrations`, ``cicd
    migrate``); returns the revisions before and after."""
    from cicd import migrations  # Alembic is loaded only where the schema changes

    return migrations.upgrade(engine())
