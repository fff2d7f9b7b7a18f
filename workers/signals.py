"""Celery signal handlers that keep ``task_states`` and ``task_stages`` current.

Grouped by subject, the way Celery declares its own signals. They run in the
worker process that runs the stage, right before and after it, so the
database says which node runs which stage of which build, and how it ended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import signals
from sqlalchemy import select
from sqlalchemy.orm import Session

from cicd import db, lifecycle
from cicd.broker import STAGE_TASKS
from cicd.config import load_settings
from cicd.errors import BuildFailed, LeaseLost
from cicd.models import Stage, StageState, TaskStage, TaskState, TaskStatus, utcnow
from workers import capacity, heartbeats, lease, reaper, workspace
from workers.stages import describe_error

__all__: list[str] = []

log = logging.getLogger(__name__)
_STAGE_BY_TASK = {name: Stage(stage) for stage, name in STAGE_TASKS.items()}
#: The node's heartbeat thread, from worker_ready to worker_shutdown (main process).
_heartbeat: heartbeats.Heartbeat | None = None


def _build_of(sender: Any, args: Any) -> tuple[int, Stage, int] | None:
    """(task id, stage, attempt) when ``sender`` is one of our stage tasks, else None."""
    stage = _STAGE_BY_TASK.get(getattr(sender, "name", None))
    if stage is None or not args or not isinstance(args[0], dict) or "task_id" not in args[0]:
        return None
    return int(args[0]["task_id"]), stage, int(args[0].get("attempt", 1))


def _record(
    build: tuple[int, Stage, int],
    stage_state: StageState,
    worker: str | None,
    transition: Callable[[Session], bool] | None = None,
) -> None:
    """Write the stage row, and the task's ``transition`` (:mod:`cicd.lifecycle`) if the stage
    changes the task, in one transaction; a failure is logged, not raised.

    A canceled build stays canceled whatever its stages report afterwards, and
    a stage of an older attempt changes nothing: the task row is locked while it
    is read, so a cancel cannot slip in between.
    """
    task_id, stage, attempt = build
    now = utcnow()

    def write() -> None:
        with db.session() as session:  # the build's row and the stage's, in one locking read
            this_stage = (TaskStage.task_id == TaskStatus.task_id) & (TaskStage.stage == stage)
            found = session.execute(
                select(TaskStatus, TaskStage)
                .outerjoin(TaskStage, this_stage)
                .where(TaskStatus.task_id == task_id)
                # The build's row is the lock (PostgreSQL locks no outer join's nullable
                # side; MariaDB ignores OF and locks the stage row too).
                .with_for_update(of=TaskStatus)
            ).first()
            if found is None or found[0].attempt != attempt:
                return
            status, row = found
            if status.state is TaskState.CANCELED:
                if row is not None and row.state is StageState.RUNNING:
                    row.state, row.finished_at = StageState.CANCELED, now
                session.commit()
                return
            if status.state.finished or (
                stage_state is StageState.RUNNING
                and row is not None
                and row.state in (StageState.SUCCESS, StageState.SKIPPED)
            ):
                return  # a redelivered message of a stage that already ended: changes nothing
            if transition is not None and not transition(session):
                return  # lost to another change of the build
            row = row or TaskStage(task_id=task_id, stage=stage, started_at=now)
            if stage_state is StageState.RUNNING:
                row.started_at, row.finished_at = now, None
            else:
                row.finished_at = now
            row.state, row.worker = stage_state, worker or row.worker
            session.add(row)
            session.commit()

    try:
        db.retrying(write, f"task {task_id}: recording {stage} {stage_state}")
    except Exception:
        log.exception("task %s: could not record %s %s", task_id, stage, stage_state)


# --- task lifecycle -----------------------------------------------------------


@signals.task_prerun.connect
def on_stage_start(sender: Any = None, args: Any = None, **_: Any) -> None:
    build = _build_of(sender, args)
    if build is None:
        return
    task_id, stage, attempt = build
    if stage is Stage.CLONE:
        return  # a clone starts by claiming a slot on the node (StageTask.before_start)
    hostname = sender.request.hostname
    if args[0].get("node") not in (None, hostname):
        return  # another node's stage, given back by the broker: StageTask.before_start
    _record(build, StageState.RUNNING, hostname,
            lambda s: lifecycle.start_stage(s, task_id, attempt, stage, hostname))  # fmt: skip


@signals.task_success.connect
def on_stage_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    build = _build_of(sender, [result])
    if build is None:
        return
    task_id, stage, attempt = build
    skipped = isinstance(result, dict) and result.get("skipped") == stage.value
    transition = None
    if stage is Stage.PUBLISH:  # the last stage: the build succeeded
        image = {}
        if isinstance(result, dict) and result.get("image"):
            image = {"image": result["image"], "image_digest": result.get("image_digest")}
        transition = lambda s: lifecycle.succeed(s, task_id, attempt, **image)  # noqa: E731
    state = StageState.SKIPPED if skipped else StageState.SUCCESS
    _record(build, state, sender.request.hostname, transition)


@signals.task_failure.connect
def on_stage_failure(
    sender: Any = None, exception: BaseException | None = None, args: Any = None, **_: Any
) -> None:
    build = _build_of(sender, args)
    if build is None or isinstance(exception, LeaseLost):
        return  # a run stopped for its lease is no result: StageTask hands the build back
    task_id, stage, attempt = build
    error = describe_error(exception)[:10000] if exception else "unknown error"
    code = exception.exit_code if isinstance(exception, BuildFailed) else None
    _record(build, StageState.FAILED, sender.request.hostname,
            lambda s: lifecycle.fail(s, task_id, attempt, stage, error, code))  # fmt: skip


# --- worker processes ---------------------------------------------------------


@signals.worker_process_init.connect
def on_pool_process_start(**_: Any) -> None:
    """A forked pool process must not reuse its parent's database connections."""
    db.reset()


# --- worker nodes -------------------------------------------------------------------------


def _remove_leftover_containers(sender: Any) -> None:
    """Build containers of this node that outlived their build (a crash, a cold shutdown)."""
    settings = load_settings()
    node = getattr(sender, "hostname", None)
    if settings.executor != "docker" or not node:
        return
    from workers.executors.docker import remove_node_containers

    removed = remove_node_containers(settings, node)
    if removed:
        log.warning("%s: removed %d leftover build container(s)", node, removed)


@signals.celeryd_after_setup.connect
def on_node_setup(sender: str, instance: Any, **_: Any) -> None:
    """Before the pool forks and the node consumes: its name and slots, and its former life.

    Builds still recorded ``running`` under this node's name ran in a process
    that is gone (a restart): they are run again, on any node.
    """
    capacity.node.configure(sender, int(instance.concurrency or 1))
    # Builds here need the lease from now on; the first heartbeat gives it, before any
    # build can start (the heartbeat thread renews it from worker_ready on).
    lease.hold()
    heartbeats.record_and_renew(heartbeats.Node(sender, int(instance.concurrency or 1)))
    try:
        reaper.rerun_builds_of_restarted_node(sender)
    except Exception:
        log.exception("%s: could not look for the builds of its former run", sender)


@signals.worker_ready.connect
def on_worker_ready(sender: Any = None, **_: Any) -> None:
    """The node is up: its heartbeats start, and what a crash left behind goes."""
    global _heartbeat
    capacity.node.attach(sender)
    _heartbeat = heartbeats.Heartbeat(
        heartbeats.Node(hostname=sender.hostname, concurrency=sender.controller.concurrency)
    )
    _heartbeat.start()
    _remove_leftover_containers(sender)
    try:
        workspace.remove_finished_workspaces()
    except Exception:
        log.exception("could not remove the workspaces of finished builds")


@signals.heartbeat_sent.connect
def on_heartbeat(**_: Any) -> None:
    """Every 2 s while the broker is up: pause or resume the shared queues (capacity)."""
    if _heartbeat is not None:
        _heartbeat.broker_seen()
    capacity.node.rebalance()


@signals.worker_shutdown.connect
def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    _remove_leftover_containers(sender)
    if _heartbeat is not None:
        _heartbeat.stop()
