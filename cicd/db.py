"""Database engine and sessions, created on first use and never at import time.

Each process (gunicorn worker, Celery pool child) builds its own engine: a
connection pool must not cross a ``fork``. :func:`reset` is called after a fork.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from cicd.config import load_settings
from cicd.models import Base

__all__ = ["engine", "session", "reset", "create_schema"]


@functools.cache
def engine() -> Engine:
    """The process's engine; ``pool_pre_ping`` survives a database restart."""
    settings = load_settings()
    settings.require("database_url")
    url = settings.database_url
    options: dict = {"pool_pre_ping": True}
    if url.startswith(("mysql", "mariadb")):
        options.update(pool_recycle=3600, pool_size=5, max_overflow=10)
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


def reset() -> None:
    """Forget the engine of the parent process after a fork, without closing its sockets."""
    if engine.cache_info().currsize:
        engine().dispose(close=False)
    engine.cache_clear()
    _sessionmaker.cache_clear()


def create_schema() -> None:
    """Create every table that does not exist yet (``cicd init-db``)."""
    Base.metadata.create_all(engine())
