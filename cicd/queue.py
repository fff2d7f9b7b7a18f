"""The one place that sends builds to the broker: the clone → build → publish chain.

Callers commit the task's rows first, then call :func:`send_task`; only ids and
plain dicts travel through the broker (JSON), never ORM objects. A task the
broker did not take is marked failed with ``enqueued_at`` empty, so it never
sits ``queued`` forever and a redelivery of its webhook can send it again.
"""

from __future__ import annotations

from celery import chain
from celery.utils.nodenames import worker_direct
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy import update
from sqlalchemy.orm import Session

from cicd import db
from cicd.errors import OpsCDError
from cicd.models import TaskState, TaskStatus, utcnow
from workers.celery_app import BUILD_QUEUE, FAST_FAIL_RETRY_POLICY, STAGE_TASKS, app

__all__ = [
    "BrokerUnavailable",
    "BROKER_DOWN",
    "send_task",
    "enqueue_build",
    "revoke_build",
    "send_publish",
    "stage_task_id",
]

BROKER_DOWN = "not sent to the broker (unavailable); waiting for the forge to redeliver"


class BrokerUnavailable(OpsCDError):
    """The broker could not take the build; nothing was sent."""


def stage_task_id(task_id: int, stage: str) -> str:
    """Celery task id of one stage of one build: stable, so a stage can be found and revoked."""
    return f"opscd-{task_id}-{stage}"


def enqueue_build(task_id: int, attempt: int = 1, queue: str = BUILD_QUEUE) -> None:
    """Send the build's chain; any node consuming ``queue`` takes the clone stage."""
    signatures = [
        app.signature(name, task_id=stage_task_id(task_id, stage))
        for stage, name in STAGE_TASKS.items()
    ]
    signatures[0].args = ({"task_id": task_id, "attempt": attempt},)
    try:
        chain(*signatures).apply_async(queue=queue, retry_policy=FAST_FAIL_RETRY_POLICY)
    except (KombuError, RedisError, OSError) as error:
        raise BrokerUnavailable(f"could not send build {task_id} to the broker: {error}") from None


def send_task(task_id: int, session: Session | None = None) -> None:
    """Enqueue a committed task and record the outcome; raises :class:`BrokerUnavailable`.

    ``session``: the caller's, to record the outcome without a second checkout.
    """
    try:
        enqueue_build(task_id)
    except BrokerUnavailable:
        _set_status(task_id, session, state=TaskState.FAILED, error=BROKER_DOWN,
                    finished_at=utcnow())  # fmt: skip
        raise
    _set_status(task_id, session, enqueued_at=utcnow())


def send_publish(task_id: int, node: str, ctx: dict) -> None:
    """Send an approved build's publish stage to the node that holds its workspace."""
    signature = app.signature(
        STAGE_TASKS["publish"], args=(ctx,), task_id=stage_task_id(task_id, "publish")
    )
    try:
        signature.apply_async(queue=worker_direct(node), retry_policy=FAST_FAIL_RETRY_POLICY)
    except (KombuError, RedisError, OSError) as error:
        raise BrokerUnavailable(f"could not send publish of {task_id}: {error}") from None


def revoke_build(task_id: int) -> None:
    """Tell every worker to drop the build's stages still in the queue (best effort).

    Workers keep revoked ids in memory only; the stages also check the task's
    state before they start, so a canceled build never runs even without this.
    """
    try:
        app.control.revoke([stage_task_id(task_id, stage) for stage in STAGE_TASKS])
    except (KombuError, RedisError, OSError):
        pass


def _set_status(task_id: int, session: Session | None, **values: object) -> None:
    statement = update(TaskStatus).where(TaskStatus.task_id == task_id).values(**values)
    if session is not None:
        session.execute(statement)
        session.commit()
        return
    with db.session() as own:
        own.execute(statement)
        own.commit()
