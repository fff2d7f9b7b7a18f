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
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    PoolResetState,
    create_engine,
    event,
    func,
    literal,
    literal_column,
    text,
)
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from cicd.config import Settings
from cicd.errors import ConfigError
from cicd.models import Timestamp, utcnow

__all__ = [
    "configure", "engine", "autocommit_engine", "session", "held_session", "clock", "now_in_sql",
    "login", "retrying", "retry_conflicts", "reset", "migrate",
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
    """The process's engine; a pooled connection is pinged before use (so a database restart
    costs no request), on MySQL/MariaDB only once it has been idle (:func:`_ping_if_idle`)."""
    return _create_engine()


@functools.cache
def autocommit_engine() -> Engine:
    """An engine whose statements commit as they run, for the one-statement writes of the
    agents' heartbeats: a COMMIT per heartbeat is a round trip per agent every 2 s. Its
    connections are a pool of their own (a node's one heartbeat thread uses one), never
    pinged: a connection the server dropped fails its statement, and the caller runs
    it again on a new one (:func:`workers.heartbeats.record_heartbeat`). On PostgreSQL
    its commits do not wait for the disk (``synchronous_commit = off``): a heartbeat
    lost in a crash of the server only makes its node look a little older."""
    # Nothing is ever left open to roll back: SQLAlchemy would end each use with the
    # driver's rollback() all the same, which PyMySQL sends as a ROLLBACK, a round trip.
    return _create_engine(isolation_level="AUTOCOMMIT", ping=False, durable=False,
                          pool_reset_on_return=None, skip_autocommit_rollback=True)  # fmt: skip


def _create_engine(ping: bool = True, durable: bool = True, **overrides: Any) -> Engine:
    url = _url
    if url is None:
        raise ConfigError("the database is not configured: the process must call db.configure()")
    options: dict = {"pool_pre_ping": True}
    mysql = url.startswith(("mysql", "mariadb"))
    if mysql:
        # As many pooled connections as a gunicorn worker has threads (8) and more:
        # a connection closed and reopened per request costs PyMySQL ~20 ms of CPU.
        options.update(pool_recycle=3600, pool_size=10, max_overflow=20)
        # A database that is down must fail a request in seconds (the webhook then
        # answers 503 while GitLab still waits), not hang it.
        options["connect_args"] = {"connect_timeout": 3, "read_timeout": 60, "write_timeout": 60}
        # Each checkout and return cost a round trip (a ping, a ROLLBACK) that a busy
        # webhook need not make: _ping_if_idle and _rollback_if_open do them when needed.
        options.update(pool_pre_ping=False, pool_reset_on_return=None)
    if url.startswith("postgresql"):
        # As on MariaDB: a database that is down fails a request in seconds.
        options.update(pool_size=10, max_overflow=20)
        options["connect_args"] = {"connect_timeout": 3}
        if not durable:
            options["connect_args"]["options"] = "-c synchronous_commit=off"
    if url.startswith("sqlite"):
        # Web threads, workers and their pool processes all write: wait for the lock.
        options["connect_args"] = {"timeout": 30}
    if not ping:
        options["pool_pre_ping"] = False
    created = create_engine(url, **{**options, **overrides})
    if url.startswith("sqlite"):
        event.listen(created, "connect", _sqlite_pragmas)
    if mysql:
        event.listen(created, "reset", _rollback_if_open)
        event.listen(created, "connect", _mark_idle)
        event.listen(created, "checkin", _mark_idle)
        if ping:
            event.listen(created, "checkout", functools.partial(_ping_if_idle, created.dialect))
    return created


#: A pooled connection idle for longer than this is pinged before it is used again.
PING_IDLE_AFTER = 1.0


def _mark_idle(_dbapi_connection, record) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dialect, dbapi_connection, record, _proxy) -> None:
    """Ping a connection that sat in the pool for more than :data:`PING_IDLE_AFTER` seconds;
    one that fails is replaced (the pool connects again, or raises if it cannot).

    ``pool_pre_ping`` pings at every checkout: a round trip per request, ~50 µs
    of PyMySQL's CPU, that a connection given back a moment ago does not need.
    A restart, a failover or a cut link takes longer than that moment, and a
    connection that was idle across it is pinged. (A connection that fails in
    use all the same makes SQLAlchemy invalidate the whole pool, and the caller
    sees the OperationalError it sees while the database is down: the webhook
    answers 503.)
    """
    idle_since = record.info.get("idle_since")
    if idle_since is not None and time.monotonic() - idle_since < PING_IDLE_AFTER:
        return
    try:
        dialect.do_ping(dbapi_connection)
    except dialect.loaded_dbapi.Error as error:
        if dialect.is_disconnect(error, dbapi_connection, None):
            raise DisconnectionError(f"connection lost while idle: {error}") from error
        raise


#: PyMySQL's ``server_status`` bit: the server has a transaction open on this connection.
_SERVER_STATUS_IN_TRANS = 1


def _rollback_if_open(dbapi_connection, _record, state: PoolResetState) -> None:
    """Reset a connection given back to the pool: roll back only an open transaction.

    The pool's default sends ROLLBACK on every return, also after a commit,
    when nothing is open: a round trip (~50 µs of PyMySQL's CPU) per checkout,
    as many as the webhook's own statements. SQLAlchemy itself rolls back a
    transaction it still has open before the connection comes back
    (``transaction_was_reset``), so this reset only meets what the driver did
    behind SQLAlchemy's back (nothing in OpsCD runs SQL that way): a
    transaction that wrote, which every MySQL/MariaDB reply reports and
    PyMySQL keeps, is rolled back (a read-only one is not reported, and not
    seen); a driver that keeps no status is rolled back as before. One being
    discarded needs no reset.
    """
    if state.transaction_was_reset or state.terminate_only:
        return
    status = getattr(dbapi_connection, "server_status", None)
    if status is None or status & _SERVER_STATUS_IN_TRANS:
        dbapi_connection.rollback()


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


@contextmanager
def held_session() -> Iterator[Session]:
    """A session on one pooled connection, held until the block ends, across its commits.

    A :func:`session` gives its connection back at each commit and takes one
    again for its next statement (a checkout: a ping, and a reset at the
    return); a request that commits, sends, then records that it sent (the
    webhook) keeps one connection instead. For short blocks only: the
    connection is the pool's for no one else meanwhile.
    """
    with engine().connect() as connection, Session(bind=connection, expire_on_commit=False) as db:
        try:
            yield db
        except BaseException:
            db.rollback()
            raise


#: The database server's "now" in UTC, per dialect (SQLite's is this host's: it has no other).
_NOW_IN_UTC = {"mysql": "SELECT UTC_TIMESTAMP(6)", "mariadb": "SELECT UTC_TIMESTAMP(6)",
               "postgresql": "SELECT timezone('UTC', now())"}  # fmt: skip


def now_in_sql(dialect: str) -> ColumnElement[dt.datetime]:
    """The database's "now" in UTC as an SQL expression, for a statement that writes it
    without asking first (SQLite's is this host's clock, bound as a value)."""
    if dialect in ("mysql", "mariadb"):
        return func.utc_timestamp(literal_column("6"), type_=Timestamp)
    if dialect == "postgresql":
        return func.timezone("UTC", func.now(), type_=Timestamp)
    return literal(utcnow(), Timestamp)


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


#: Each engine's login, asked once: an engine's credentials never change in a process.
_LOGINS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def login(db: Session | Connection) -> str | None:
    """The database account this session is logged in as, as the server knows it (asked
    once per engine: every heartbeat and every clone's claim would ask again).

    An agent's identity is its account (:mod:`cicd.agents`): the server
    authenticated it, so no node can claim another's by saying so.
    """
    bind = db.get_bind() if isinstance(db, Session) else db
    engine_of = getattr(bind, "engine", bind)
    if engine_of in _LOGINS:
        return _LOGINS[engine_of]
    query = _LOGIN.get(bind.dialect.name)
    if not query:
        return None
    account = db.execute(text(query)).scalar_one()
    _LOGINS[engine_of] = account
    return account


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


#: Errors that mean two transactions collided, not that the database is down: on
#: MySQL/MariaDB a deadlock (InnoDB rolled this one back) and a lock wait timeout, by error
#: number; on PostgreSQL a deadlock, a serialization failure and a lock timeout, by SQLSTATE.
CONFLICTS = frozenset({1205, 1213})
CONFLICT_STATES = frozenset({"40P01", "40001", "55P03"})


def _conflict(error: OperationalError) -> bool:
    cause = error.orig
    if getattr(cause, "sqlstate", None) in CONFLICT_STATES:  # psycopg
        return True
    return bool(cause is not None and cause.args and cause.args[0] in CONFLICTS)


def retry_conflicts(operation: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Run ``operation`` (one whole transaction) again when it lost a lock conflict.

    InnoDB (and PostgreSQL's deadlock detector) picks a victim when, say, a
    webhook's insert and an auto-cancel's range update wait on each other, and
    asks it to "try restarting transaction"; that is a normal answer under
    concurrency, not an outage, so the caller should not see it. Anything else,
    and the last conflict, is raised.
    """
    attempt = 1
    while True:
        try:
            return operation()
        except OperationalError as error:
            if not _conflict(error) or attempt >= attempts:
                raise
            log.info("%s: %s; running it again", what, error.orig)
            time.sleep(random.uniform(0, 0.02 * attempt))  # noqa: S311 (jitter, not a secret)
            attempt += 1


def reset() -> None:
    """Forget the engine of the parent process after a fork, without closing its sockets."""
    for made in (engine, autocommit_engine):
        if made.cache_info().currsize:
            made().dispose(close=False)
        made.cache_clear()
    _sessionmaker.cache_clear()


def migrate() -> tuple[str | None, str]:
    """Create or upgrade the schema to the newest migration (:mod:`cicd.migrations`, ``cicd
    migrate``); returns the revisions before and after."""
    from cicd import migrations  # Alembic is loaded only where the schema changes

    return migrations.upgrade(engine())
