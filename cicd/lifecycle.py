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
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, update
from sqlalchemy.orm import Session

from cicd.models import Stage, TaskDetail, TaskState, TaskStatus, utcnow

__all__ = [
    "BROKER_DOWN",
    "UNFINISHED",
    "accept",
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


def accept(detail: TaskDetail) -> TaskDetail:
    """A new build (a push, a retry): ``queued``, not yet sent. The caller adds and commits."""
    detail.status = TaskStatus(state=QUEUED, queued_at=utcnow())
    return detail


def sent(session: Session, task_id: int) -> bool:
    """The broker took the build's chain."""
    return _move(session, task_id, (QUEUED,), enqueued_at=utcnow())


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
    return _move(session, task_id, (QUEUED, RUNNING), *_run(attempt), state=RUNNING,
                 stage=stage, worker=node)  # fmt: skip


def succeed(session: Session, task_id: int, attempt: int, **result: Any) -> bool:
    """The last stage ended well; ``result``: ``image``, ``image_digest``."""
    return _move(session, task_id, (RUNNING,), *_run(attempt), state=TaskState.SUCCESS,
                 finished_at=utcnow(), exit_code=0, **result)  # fmt: skip


def fail(
    session: Session, task_id: int, attempt: int, stage: Stage, error: str,
    exit_code: int | None = None,
) -> bool:  # fmt: skip
    """A stage failed: the build ends ``failed``, saying where and why."""
    values: dict[str, Any] = {"stage": stage, "error": error, "finished_at": utcnow()}
    if exit_code is not None:
        values["exit_code"] = exit_code
    return _move(session, task_id, (QUEUED, RUNNING), *_run(attempt), state=TaskState.FAILED,
                 **values)  # fmt: skip


def wait(session: Session, task_id: int) -> bool:
    """The build succeeded; publishing waits for a person (the approval row goes with it)."""
    return _move(session, task_id, (RUNNING,), state=WAITING)


def approve(session: Session, task_id: int) -> bool:
    """Publishing may go on: ``queued`` until the publish stage starts on its node."""
    return _move(session, task_id, (WAITING,), state=QUEUED)


def unapprove(session: Session, task_id: int) -> bool:
    """The approved publish could not be sent (broker down): the build waits again."""
    return _move(session, task_id, (QUEUED,), state=WAITING)


def reject(session: Session, task_id: int, who: str) -> bool:
    """No publishing: the build ends ``canceled``."""
    return _move(session, task_id, (WAITING,), state=TaskState.CANCELED, finished_at=utcnow(),
                 error=f"rejected by {who}")  # fmt: skip


def cancel(session: Session, task_id: int, reason: str = "canceled") -> bool:
    """Someone stopped the build, or a newer push superseded it."""
    return _move(session, task_id, UNFINISHED, state=TaskState.CANCELED, finished_at=utcnow(),
                 error=reason)  # fmt: skip


def supersede(session: Session, task_ids: list[int], newest: int) -> int:
    """``CICD_AUTO_CANCEL``: the unfinished of ``task_ids`` are canceled by build ``newest``.

    One statement for all of them (row locks taken in one order, so a burst of
    pushes to one branch does not deadlock); returns how many it canceled.
    """
    if not task_ids:
        return 0
    statement = (
        update(TaskStatus)
        .where(TaskStatus.task_id.in_(task_ids), TaskStatus.state.in_(UNFINISHED))
        .values(
            state=TaskState.CANCELED,
            finished_at=utcnow(),
            updated_at=utcnow(),
            error=f"superseded by {newest}",
        )
    )
    return session.execute(statement).rowcount


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
    return _move(session, task_id, (RUNNING,), TaskStatus.worker == node, *_run(attempt),
                 state=TaskState.FAILED, attempt=attempt + 1, stage=None, worker=None,
                 finished_at=utcnow(), error=reason)  # fmt: skip
