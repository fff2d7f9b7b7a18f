"""The build's lifecycle (``cicd.lifecycle``) on SQLite, MariaDB and PostgreSQL, without
gunicorn or Celery.

Every transition is a conditional UPDATE that says whether it won; the races
run real concurrent transactions (threads, one connection each).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import DATABASES, mysql_admin
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session

from cicd import db, lifecycle
from cicd.config import settings_from
from cicd.models import (
    Base,
    RefType,
    Stage,
    TaskDetail,
    TaskLog,
    TaskState,
    TaskStatus,
    utcnow,
)


@pytest.fixture(params=["sqlite", *DATABASES])
def engine(request, tmp_path, make_database) -> Iterator[Engine]:
    if request.param == "sqlite":
        made = create_engine(f"sqlite:///{tmp_path / 'life.db'}", connect_args={"timeout": 30})
        event.listen(made, "connect", lambda conn, _: conn.execute("PRAGMA journal_mode=WAL"))
    else:
        made = create_engine(make_database("opscd_life", request.param)[1], pool_size=10)
    Base.metadata.create_all(made)
    yield made
    made.dispose()


def new_task(engine: Engine) -> int:
    with Session(engine) as session:
        detail = TaskDetail(
            forge="gitlab",
            project="life/app",
            clone_url="http://127.0.0.1:9/a.git",
            ref_type=RefType.BRANCH,
            ref_name="main",
            commit_sha="a" * 40,
        )
        session.add(lifecycle.accept(detail))
        session.commit()
        return detail.id


def state(engine: Engine, task_id: int) -> TaskStatus:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(TaskStatus, task_id)


def run(engine: Engine, transition: Callable[..., bool], *args, **kwargs) -> bool:
    with Session(engine) as session:
        won = transition(session, *args, **kwargs)
        session.commit()
        return won


def race(engine: Engine, attempts: list[Callable[[Session], bool]]) -> list[bool]:
    """Run the attempts at once, each in its own transaction; their results in order."""
    start, results = threading.Barrier(len(attempts)), [False] * len(attempts)

    def go(index: int) -> None:
        with Session(engine) as session:
            start.wait()
            results[index] = attempts[index](session)
            session.commit()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(attempts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_build_from_push_to_success(engine):
    task_id = new_task(engine)
    assert state(engine, task_id).state is TaskState.QUEUED
    assert run(engine, lifecycle.sent, task_id)
    assert run(engine, lifecycle.claim, task_id, 1, "a@host")
    assert (state(engine, task_id).worker, state(engine, task_id).stage) == ("a@host", Stage.CLONE)
    assert run(engine, lifecycle.start_stage, task_id, 1, Stage.BUILD, "a@host")
    assert run(engine, lifecycle.succeed, task_id, 1, image="r/x:main-aaaa")
    done = state(engine, task_id)
    assert (done.state, done.exit_code, done.image) == (TaskState.SUCCESS, 0, "r/x:main-aaaa")
    # Nothing moves a finished build.
    for transition, args in [
        (lifecycle.claim, (1, "b@host")),
        (lifecycle.cancel, ()),
        (lifecycle.fail, (1, Stage.BUILD, "late")),
        (lifecycle.wait, ()),
    ]:
        assert not run(engine, transition, task_id, *args)
    assert state(engine, task_id).state is TaskState.SUCCESS


def test_a_stage_of_another_run_changes_nothing(engine):
    task_id = new_task(engine)
    assert run(engine, lifecycle.claim, task_id, 1, "a@host")
    assert run(engine, lifecycle.requeue, task_id, 1, "a@host")  # a@host died
    again = state(engine, task_id)
    assert (again.state, again.attempt, again.worker) == (TaskState.QUEUED, 2, None)
    assert not run(engine, lifecycle.start_stage, task_id, 1, Stage.BUILD, "a@host")
    assert not run(engine, lifecycle.succeed, task_id, 1)
    assert not run(engine, lifecycle.requeue, task_id, 1, "a@host")  # the second reaper
    assert run(engine, lifecycle.claim, task_id, 2, "b@host")
    assert not run(engine, lifecycle.give_up, task_id, 2, "a@host", "gone")  # not its node
    assert run(engine, lifecycle.give_up, task_id, 2, "b@host", "gone")
    assert (state(engine, task_id).state, state(engine, task_id).error) == (
        TaskState.FAILED,
        "gone",
    )


def test_a_run_given_up_for_dead_adds_nothing_to_the_log_and_says_so(engine, caplog):
    """The log's fence (``workers.logs.task_log_store``): one INSERT … SELECT that stores a
    line only while its run is the task's current one, and knows whether it did."""
    from workers.logs import task_log_store

    caplog.set_level(logging.INFO, "workers.logs")
    task_id = new_task(engine)
    assert run(engine, lifecycle.claim, task_id, 1, "a@host")
    db.configure(settings_from({"CICD_DATABASE_URL": engine.url.render_as_string(False)}))
    try:
        task_log_store(task_id, Stage.BUILD, 1)("line of run 1\n")
        assert "no longer current" not in caplog.text
        assert run(engine, lifecycle.requeue, task_id, 1, "a@host")  # a@host taken for dead
        task_log_store(task_id, Stage.BUILD, 1)("late line of run 1\n")
        task_log_store(task_id, Stage.BUILD, 2)("line of run 2\n")
    finally:
        db.reset()
    assert caplog.text.count(f"task {task_id}: run 1 is no longer current") == 1
    with Session(engine) as session:
        rows = session.execute(select(TaskLog.attempt, TaskLog.content).order_by(TaskLog.id))
        assert [tuple(row) for row in rows] == [(1, "line of run 1\n"), (2, "line of run 2\n")]


def test_approval_waits_and_decides_once(engine):
    approved, rejected = new_task(engine), new_task(engine)
    for task_id in (approved, rejected):
        assert run(engine, lifecycle.claim, task_id, 1, "a@host")
        assert run(engine, lifecycle.wait, task_id)
    assert (
        race(
            engine,
            [
                lambda s: lifecycle.approve(s, approved),
                lambda s: lifecycle.reject(s, approved, "ann"),
            ],
        ).count(True)
        == 1
    )
    assert run(engine, lifecycle.reject, rejected, "bob")
    assert not run(engine, lifecycle.approve, rejected)
    assert state(engine, rejected).error == "rejected by bob"
    if state(engine, approved).state is TaskState.QUEUED:
        assert run(engine, lifecycle.unapprove, approved)  # its publish could not be sent
        assert state(engine, approved).state is TaskState.WAITING


def test_a_build_the_broker_did_not_take_is_sent_again_by_one_claimer(engine):
    task_id = new_task(engine)
    assert run(engine, lifecycle.unsent, task_id)
    failed = state(engine, task_id)
    assert (failed.state, failed.error, failed.enqueued_at) == (
        TaskState.FAILED,
        lifecycle.BROKER_DOWN,
        None,
    )
    # The forge's redelivery and a reconciler at once: one sends.
    later = utcnow() + dt.timedelta(seconds=1)
    wins = race(
        engine,
        [
            lambda s: lifecycle.claim_unsent(s, task_id),
            lambda s: lifecycle.claim_unsent(s, task_id, recorded_before=later),
        ],
    )
    assert wins.count(True) == 1
    claimed = state(engine, task_id)
    assert claimed.state is TaskState.QUEUED and claimed.enqueued_at and claimed.error is None
    # A build recorded but never sent (its web process died): the reconciler's, in time.
    crashed = new_task(engine)
    assert not run(engine, lifecycle.claim_unsent, crashed)  # not the forge's to resend
    assert not run(
        engine, lifecycle.claim_unsent, crashed, recorded_before=utcnow() - dt.timedelta(seconds=60)
    )
    assert run(
        engine, lifecycle.claim_unsent, crashed, recorded_before=utcnow() + dt.timedelta(seconds=1)
    )


def test_two_claims_of_one_build_exactly_one_wins(engine):
    task_id = new_task(engine)
    wins = race(
        engine, [lambda s, n=n: lifecycle.claim(s, task_id, 1, f"n{n}@host") for n in range(4)]
    )
    assert wins.count(True) == 1
    assert state(engine, task_id).worker == f"n{wins.index(True)}@host"


def test_cancel_and_the_end_of_a_stage_race_one_wins(engine):
    for ending in (lifecycle.succeed, lambda s, t, a: lifecycle.fail(s, t, a, Stage.BUILD, "x")):
        task_id = new_task(engine)
        assert run(engine, lifecycle.claim, task_id, 1, "a@host")
        wins = race(
            engine,
            [
                lambda s, t=task_id: lifecycle.cancel(s, t, "stop"),
                lambda s, t=task_id, end=ending: end(s, t, 1),
            ],
        )
        assert wins.count(True) == 1
        final = state(engine, task_id).state
        assert (
            final is TaskState.CANCELED
            if wins[0]
            else final in (TaskState.SUCCESS, TaskState.FAILED)
        )


def test_hand_back_and_cancel_of_a_queued_build(engine):
    task_id = new_task(engine)
    assert run(engine, lifecycle.claim, task_id, 1, "a@host")
    assert run(engine, lifecycle.hand_back, task_id, 1)
    back = state(engine, task_id)
    assert (back.state, back.worker, back.stage) == (TaskState.QUEUED, None, None)
    assert run(engine, lifecycle.cancel, task_id, "superseded by 9")
    assert not run(engine, lifecycle.cancel, task_id)
    assert state(engine, task_id).error == "superseded by 9"


def test_only_the_lifecycle_writes_a_build_state():
    """No ``update(TaskStatus)`` and no new ``TaskStatus(...)`` row anywhere else."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    writers = []
    for path in [*root.glob("cicd/**/*.py"), *root.glob("workers/**/*.py")]:
        if path.name == "lifecycle.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            first = node.args[0] if node.args else None
            if (name == "update" and getattr(first, "id", None) == "TaskStatus") or (
                name == "TaskStatus"
            ):
                writers.append(f"{path.relative_to(root)}:{node.lineno}")
    assert writers == []


def test_a_newer_push_supersedes_only_unfinished_builds(engine):
    done, waiting, queued = new_task(engine), new_task(engine), new_task(engine)
    assert run(engine, lifecycle.claim, done, 1, "a@host")
    assert run(engine, lifecycle.succeed, done, 1)
    assert run(engine, lifecycle.claim, waiting, 1, "a@host")
    assert run(engine, lifecycle.wait, waiting)
    with Session(engine) as session:
        assert lifecycle.supersede(session, [done, waiting, queued], 99) == 2
        session.commit()
    assert [state(engine, t).state for t in (done, waiting, queued)] == [
        TaskState.SUCCESS, TaskState.CANCELED, TaskState.CANCELED,
    ]  # fmt: skip
    assert state(engine, queued).error == "superseded by 99"


@pytest.mark.parametrize("dialect", DATABASES)
def test_a_transaction_that_loses_a_deadlock_is_run_again(make_database, dialect):
    """Two transactions locking two rows in opposite orders: the database rolls one back
    ("try restarting transaction"); ``db.retry_conflicts`` runs it again, so both land."""
    made = create_engine(make_database("opscd_conflict", dialect)[1], pool_size=4)
    with made.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE counters (id INT PRIMARY KEY, n INT)")
        connection.exec_driver_sql("INSERT INTO counters VALUES (1, 0), (2, 0)")
    crossing, runs, errors = threading.Barrier(2), [], []

    def transaction(first: int, second: int) -> None:
        def run() -> None:
            runs.append(first)
            with made.begin() as connection:
                connection.exec_driver_sql(f"UPDATE counters SET n = n + 1 WHERE id = {first}")
                if len(runs) <= 2:  # only the first round crosses
                    crossing.wait(timeout=10)
                connection.exec_driver_sql(f"UPDATE counters SET n = n + 1 WHERE id = {second}")

        try:
            db.retry_conflicts(run, f"counters {first}, {second}")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=transaction, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    with made.connect() as connection:
        counts = connection.exec_driver_sql("SELECT n FROM counters ORDER BY id").scalars().all()
    made.dispose()
    assert errors == []
    assert len(runs) == 3  # one transaction was the deadlock's victim and ran again
    assert counts == [2, 2]  # and each of the two landed exactly once


def test_a_pooled_connection_comes_back_clean_and_one_dropped_while_idle_is_replaced(
    make_database,
):
    """The MariaDB pool (``cicd.db``) sends no ROLLBACK after a commit and pings only a
    connection that sat idle: a transaction that writes is still rolled back when its
    connection comes back, and a connection the server dropped while idle is replaced
    unseen."""
    url = make_database("opscd_pool")[1]
    db.configure(settings_from({"CICD_DATABASE_URL": url}))
    try:
        with db.engine().begin() as connection:
            connection.exec_driver_sql("CREATE TABLE marks (id INT PRIMARY KEY)")
        with db.engine().connect() as connection:
            first = connection.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
            connection.commit()
            # A write SQLAlchemy does not know of, left uncommitted.
            connection.connection.driver_connection.cursor().execute("INSERT INTO marks VALUES (1)")
        with db.engine().connect() as connection:
            assert connection.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one() == first
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM marks").scalar_one() == 0
        mysql_admin(f"KILL {first}")
        time.sleep(db.PING_IDLE_AFTER + 0.2)
        with db.engine().connect() as connection:
            assert connection.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one() != first
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM marks").scalar_one() == 0
    finally:
        db.reset()
