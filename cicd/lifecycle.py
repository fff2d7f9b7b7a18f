"""A build's life in one place: every change of its state is a named transition here.

::

    accept ──▶ queued ──claim──▶ running ──succeed──▶ success
                 ▲  │              │ │ └──fail──────▶ failed
                 │  │ unsent       │ └─wait──▶ waiting ──approve──▶ queued
                 │  ▼              │              └──reject──────▶ canceled
                 │ failed (never sent: a redelivery or the reconciler sends it again)
                 ├─ hand_back, requeue (a dead agent's run: attempt + 1) ◀┘
    cancel: queued | running | waiting ──▶ canceled

Each transition is one conditional UPDATE of ``task_states`` that claims the
row: ``WHERE task_id = :id AND state IN (...)`` (and the run's ``attempt``
where one run is meant), and says whether it won. Of two callers racing for
one build (two redeliveries, a cancel and a stage's end, two reapers) exactly
one wins; the other changes nothing and knows it. Transitions run in the
caller's session and do not commit: a stage row, an approval or a node's slot
count goes in the same transaction.

The broker-down policy is one: a build the broker did not take is ``failed``
with :data:`BROKER_DOWN` and ``enqueued_at`` empty (never "queued" forever, and
the reason says why); :func:`claim_unsent` hands it to whoever sends it again
first, the forge's redelivery of its webhook or a worker's reconciler.

The transitions a forge's users see also record the commit statuses they
cause (:mod:`cicd.statuses`), in the same transaction: ``opscd/build`` is
``pending`` from :func:`accept`, ``running`` from the build stage's start;
``opscd/publish`` exists for builds that publish: ``pending`` "waiting for
approval" from :func:`wait`, ``running`` once an image is being built
(:func:`cicd.statuses.publishing`); the build's end closes what is open. Moves the
forge need not see (sent, unsent, a rerun on another node) record none.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from cicd import statuses
from cicd.models import Stage, TaskDetail, TaskState, TaskStatus, utcnow

__all__ = [
    "BROKER_DOWN",
    "UNFINISHED",
    "accept",
    "accept_rows",
    "claim_lost",
    "sent",
    "unsent",
    "claim_unsent",
    "claim",
    "start_stage",
    "succeed",
    "fail",
    "wait",
    "approve",
    "unapprove",
    "reject",
    "cancel",
    "supersede",
    "hand_back",
    "requeue",
    "give_up",
]

BROKER_DOWN = "not sent to the broker (unavailable); sent again once it is back"

QUEUED, RUNNING, WAITING = TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING
UNFINISHED = (QUEUED, RUNNING, WAITING)


def _move(
    session: Session,
    task_id: int,
    from_states: tuple[TaskState, ...],
    *where: ColumnElement[bool],
    **values: Any,
) -> bool:
    """The one UPDATE every transition is: claim the row in ``from_states``; True if won."""
    statement = (
        update(TaskStatus)
        .where(TaskStatus.task_id == task_id, TaskStatus.state.in_(from_states), *where)
        .values(updated_at=utcnow(), **values)
    )
    return session.execute(statement).rowcount == 1


def _run(attempt: int | None) -> tuple[ColumnElement[bool], ...]:
    return () if attempt is None else (TaskStatus.attempt == attempt,)


# --- recorded and sent ----------------------------------------------------------------------


def accept(detail: TaskDetail, reports: bool = False) -> TaskDetail:
    """A new build (a push, a retry): ``queued``, not yet sent, and ``pending`` on the forge if
    its project ``reports`` statuses (:func:`cicd.statuses.reports`). The caller adds and
    commits."""
    detail.status = TaskStatus(state=QUEUED, queued_at=utcnow())
    return statuses.first(detail) if reports else detail


_INSERT_DETAIL = insert(TaskDetail.__table__)
_INSERT_STATUS = insert(TaskStatus.__table__)


def accept_rows(connection: Connection, fields: Mapping[str, Any], reports: bool = False) -> int:
    """:func:`accept` in SQLAlchemy Core, for the webhook: the same rows, inserted in the
    caller's transaction without the ORM's unit of work; returns the new task's id.

    ``fields`` are the task's ``task_details`` columns; the ones not given take
    their defaults, as with :func:`accept`. One INSERT per row, in the order the
    foreign keys need; the task's id comes back with its INSERT (the driver's
    last row id on MariaDB and SQLite, RETURNING where a dialect needs it), so
    the rows cost no round trip more than their statements. A delivery id seen
    before fails the first INSERT (:class:`~sqlalchemy.exc.IntegrityError`).
    The caller commits.
    """
    inserted = connection.execute(_INSERT_DETAIL, dict(fields))
    task_id = inserted.inserted_primary_key[0]
    connection.execute(_INSERT_STATUS, {"task_id": task_id, "state": QUEUED, "queued_at": utcnow()})
    if reports:
        statuses.record_first(connection, task_id)
    return task_id


#: :func:`sent`'s UPDATE (the one every build makes, right after its send), built once and
#: run in SQLAlchemy Core: building the statement and the ORM's bulk-update bookkeeping
#: cost more CPU than the round trip.
_SENT = (
    update(TaskStatus.__table__)
    .where(TaskStatus.task_id == bindparam("sent_task"), TaskStatus.state == QUEUED)
    .values(enqueued_at=bindparam("sent_at"), updated_at=bindparam("sent_at"))
)


def sent(session: Session, task_id: int) -> bool:
    """The broker took the build's chain (``queued``, its ``enqueued_at`` now)."""
    parameters = {"sent_task": task_id, "sent_at": utcnow()}
    return session.connection().execute(_SENT, parameters).rowcount == 1


def unsent(session: Session, task_id: int) -> bool:
    """The broker did not take it: ``failed`` with :data:`BROKER_DOWN`, to be sent again."""
    return _move(session, task_id, (QUEUED,), state=TaskState.FAILED, error=BROKER_DOWN,
                 enqueued_at=None, finished_at=utcnow())  # fmt: skip


def claim_unsent(
    session: Session, task_id: int, recorded_before: dt.datetime | None = None
) -> bool:
    """Claim a build that never reached the broker, to send it (:func:`unsent` if that fails).

    Such a build failed with :data:`BROKER_DOWN` (the forge's redelivery may
    claim it at once; the reconciler, with ``recorded_before``, once it failed
    before that time), or is still ``queued`` with no ``enqueued_at`` since
    before ``recorded_before``: its web process died between commit and send.
    The claim marks it sent, so of two claimers one sends.
    """
    broker_down = and_(TaskStatus.state == TaskState.FAILED, TaskStatus.error == BROKER_DOWN)
    never_sent: ColumnElement[bool] = broker_down
    if recorded_before is not None:  # the reconciler's: after the forge had its chance
        never_sent = or_(
            and_(broker_down, TaskStatus.finished_at < recorded_before),
            and_(TaskStatus.state == QUEUED, TaskStatus.queued_at < recorded_before),
        )
    return _move(session, task_id, (QUEUED, TaskState.FAILED), TaskStatus.enqueued_at.is_(None),
                 never_sent, state=QUEUED, error=None, finished_at=None,
                 enqueued_at=utcnow())  # fmt: skip


def claim_lost(session: Session, task_id: int, attempt: int, enqueued_at: dt.datetime) -> bool:
    """Claim a build sent at ``enqueued_at`` whose message the broker no longer holds, to send
    it again; of two reapers finding it, one wins (the send time is the claim)."""
    return _move(session, task_id, (QUEUED,), *_run(attempt), TaskStatus.enqueued_at == enqueued_at,
                 enqueued_at=utcnow())  # fmt: skip


# --- a run on a node ------------------------------------------------------------------------


def claim(session: Session, task_id: int, attempt: int, node: str) -> bool:
    """A clone starts run ``attempt`` on ``node`` (the caller checked the node's slots).

    Also a clone delivered again to the node already running it (its pool
    process died), never one running elsewhere.
    """
    mine = or_(TaskStatus.state == QUEUED, TaskStatus.worker == node)
    return _move(session, task_id, (QUEUED, RUNNING), mine, *_run(attempt), state=RUNNING,
                 stage=Stage.CLONE, worker=node, started_at=utcnow(), finished_at=None,
                 exit_code=None, error=None)  # fmt: skip


def start_stage(session: Session, task_id: int, attempt: int, stage: Stage, node: str) -> bool:
    """A later stage starts on the node (publish after an approval starts from ``queued``)."""
    won = _move(session, task_id, (QUEUED, RUNNING), *_run(attempt), state=RUNNING,
                stage=stage, worker=node)  # fmt: skip
    if won and stage is Stage.BUILD:
        statuses.report(session, task_id, statuses.BUILD, "running", "building")
    return won


def succeed(session: Session, task_id: int, attempt: int, **result: Any) -> bool:
    """The last stage ended well; ``result``: ``image``, ``image_digest``."""
    won = _move(session, task_id, (RUNNING,), *_run(attempt), state=TaskState.SUCCESS,
                finished_at=utcnow(), exit_code=0, **result)  # fmt: skip
    if won:
        statuses.close_open(session, [task_id], "success", "passed")
    return won


def fail(
    session: Session, task_id: int, attempt: int, stage: Stage, error: str,
    exit_code: int | None = None,
) -> bool:  # fmt: skip
    """A stage failed: the build ends ``failed``, saying where and why."""
    values: dict[str, Any] = {"stage": stage, "error": error, "finished_at": utcnow()}
    if exit_code is not None:
        values["exit_code"] = exit_code
    won = _move(session, task_id, (QUEUED, RUNNING), *_run(attempt), state=TaskState.FAILED,
                **values)  # fmt: skip
    if won:
        code = f" (exit code {exit_code})" if exit_code is not None else ""
        statuses.close_open(session, [task_id], "failed", f"failed at {stage.value}{code}")
    return won


def wait(session: Session, task_id: int) -> bool:
    """The build succeeded; publishing waits for a person (the approval row goes with it)."""
    won = _move(session, task_id, (RUNNING,), state=WAITING)
    if won:  # pending publish first: the commit never looks done while it waits
        statuses.report(session, task_id, statuses.PUBLISH, "pending", "waiting for approval")
        statuses.report(session, task_id, statuses.BUILD, "success", "built")
    return won


def approve(session: Session, task_id: int) -> bool:
    """Publishing may go on: ``queued`` until the publish stage starts on its node."""
    return _move(session, task_id, (WAITING,), state=QUEUED)


def unapprove(session: Session, task_id: int) -> bool:
    """The approved publish could not be sent (broker down): the build waits again."""
    return _move(session, task_id, (QUEUED,), state=WAITING)


def reject(session: Session, task_id: int, who: str) -> bool:
    """No publishing: the build ends ``canceled``."""
    won = _move(session, task_id, (WAITING,), state=TaskState.CANCELED, finished_at=utcnow(),
                error=f"rejected by {who}")  # fmt: skip
    if won:
        statuses.close_open(session, [task_id], "canceled", f"publishing rejected by {who}")
    return won


def cancel(session: Session, task_id: int, reason: str = "canceled") -> bool:
    """Someone stopped the build, or a newer push superseded it."""
    won = _move(session, task_id, UNFINISHED, state=TaskState.CANCELED, finished_at=utcnow(),
                error=reason)  # fmt: skip
    if won:
        statuses.close_open(session, [task_id], "canceled", reason)
    return won


def supersede(session: Session, task_ids: list[int], newest: int) -> int:
    """``CICD_AUTO_CANCEL``: the unfinished of ``task_ids`` are canceled by build ``newest``.

    One statement for all of them (row locks taken in one order, so a burst of
    pushes to one branch does not deadlock); returns how many it canceled.
    """
    if not task_ids:
        return 0
    reason = f"superseded by {newest}"
    statement = (
        update(TaskStatus)
        .where(TaskStatus.task_id.in_(task_ids), TaskStatus.state.in_(UNFINISHED))
        .values(state=TaskState.CANCELED, finished_at=utcnow(), updated_at=utcnow(), error=reason)
    )
    canceled = session.execute(statement).rowcount
    if canceled:  # which of them: this transaction's own rows say
        mine = select(TaskStatus.task_id).where(
            TaskStatus.task_id.in_(task_ids), TaskStatus.error == reason
        )
        statuses.close_open(session, session.scalars(mine).all(), "canceled", reason)
    return canceled


# --- a run handed to another node -----------------------------------------------------------


def hand_back(session: Session, task_id: int, attempt: int) -> bool:
    """The node does not build the build's language: ``queued`` for an agent that does."""
    return _move(session, task_id, (RUNNING,), *_run(attempt), state=QUEUED, stage=None,
                 worker=None)  # fmt: skip


def requeue(session: Session, task_id: int, attempt: int, node: str) -> bool:
    """The node running run ``attempt`` is gone: run it again as ``attempt + 1``, not yet sent."""
    return _move(session, task_id, (RUNNING,), TaskStatus.worker == node, *_run(attempt),
                 state=QUEUED, attempt=attempt + 1, stage=None, worker=None, enqueued_at=None,
                 started_at=None)  # fmt: skip


def give_up(session: Session, task_id: int, attempt: int, node: str, reason: str) -> bool:
    """The node running the last allowed run is gone: ``failed``, saying so."""
    won = _move(session, task_id, (RUNNING,), TaskStatus.worker == node, *_run(attempt),
                state=TaskState.FAILED, attempt=attempt + 1, stage=None, worker=None,
                finished_at=utcnow(), error=reason)  # fmt: skip
    if won:
        statuses.close_open(session, [task_id], "failed", reason)
    return won
