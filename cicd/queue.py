"""The one place that sends builds to the broker: the clone → build → publish chain.

Callers commit the task's rows first, then call :func:`enqueue_build`; only ids
and plain dicts travel through the broker (JSON), never ORM objects.
"""

from __future__ import annotations

from celery import chain
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from cicd.errors import OpsCDError
from workers.celery_app import BUILD_QUEUE, STAGE_TASKS, app

__all__ = ["BrokerUnavailable", "enqueue_build", "stage_task_id"]


class BrokerUnavailable(OpsCDError):
    """The broker could not take the build; nothing was sent."""


def stage_task_id(task_id: int, stage: str) -> str:
    """Celery task id of one stage of one build: stable, so a stage can be found and revoked."""
    return f"opscd-{task_id}-{stage}"


def enqueue_build(task_id: int, queue: str = BUILD_QUEUE) -> None:
    """Send the build's chain; any node consuming ``queue`` takes the clone stage."""
    signatures = [
        app.signature(name, task_id=stage_task_id(task_id, stage))
        for stage, name in STAGE_TASKS.items()
    ]
    signatures[0].args = ({"task_id": task_id},)
    try:
        chain(*signatures).apply_async(queue=queue)
    except (KombuError, RedisError, OSError) as error:
        raise BrokerUnavailable(f"could not send build {task_id} to the broker: {error}") from None
