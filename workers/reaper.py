"""Builds nobody is running any more: reruns for those of dead agents, sends for unsent ones.

Every worker node runs :func:`sweep` from its heartbeat thread, at most every
``CICD_REAPER_INTERVAL`` seconds, so this needs no extra process and works
as long as one node is alive (and only once that node's own heartbeats have
reached the database for ``CICD_AGENT_OFFLINE_AFTER``: see
:mod:`workers.heartbeats`). Each fix is claimed with a conditional UPDATE,
so two nodes sweeping at once never act twice on one build.

- A build ``running`` on a node that stopped heartbeating (killed, host down)
  is sent again as attempt + 1, to any node: its workspace died with the
  node. Messages of the old attempt, should Redis redeliver them, are ignored
  by the stages. After ``CICD_MAX_ATTEMPTS`` runs it is marked failed instead.
- A build recorded but never sent (the web process died between its commit
  and its send) is sent once it waited ``CICD_RECONCILE_AFTER`` seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from sqlalchemy import delete, or_, select

from cicd import broker, db, lifecycle
from cicd.broker import BUILD_QUEUE, BrokerUnavailable, language_queue, send_task, stage_task_id
from cicd.config import load_settings
from cicd.languages import LANGUAGES
from cicd.models import AgentState, TaskLog, TaskStage, TaskState, TaskStatus

__all__ = [
    "sweep",
    "rerun_builds_of_dead_agents",
    "rerun_builds_of_restarted_node",
    "rerun_lost_build",
    "rerun_fenced_build",
    "send_unsent_builds",
    "resend_lost_builds",
]

log = logging.getLogger(__name__)
_last_sweep = 0.0


def sweep(force: bool = False) -> None:
    """Run both checks if the interval has passed; errors are logged, never raised."""
    global _last_sweep
    settings = load_settings()
    if not force and time.monotonic() - _last_sweep < settings.reaper_interval:
        return
    _last_sweep = time.monotonic()
    for check in (rerun_builds_of_dead_agents, send_unsent_builds, resend_lost_builds):
        try:
            check()
        except Exception:
            log.exception("%s failed", check.__name__)


def rerun_builds_of_dead_agents() -> list[int]:
    """Send again (or fail) every build running on a node that stopped heartbeating."""
    settings = load_settings()
    with db.session() as session:
        # Both ages on the database's clock: the heartbeats were written with it.
        silent_since = db.clock(session) - dt.timedelta(seconds=settings.agent_offline_after)
        dead = select(AgentState.hostname).where(
            or_(AgentState.online.is_(False), AgentState.last_heartbeat < silent_since)
        )
        orphans = session.execute(
            select(TaskStatus.task_id, TaskStatus.worker, TaskStatus.attempt).where(
                TaskStatus.state == TaskState.RUNNING, TaskStatus.worker.in_(dead)
            )
        ).all()
    handled = []
    for task_id, node, attempt in orphans:
        if _rerun(task_id, node, attempt, settings.max_attempts):
            handled.append(task_id)
    return handled


def rerun_builds_of_restarted_node(node: str) -> list[int]:
    """At a node's start: builds still ``running`` under its name are its former life's.

    A node restarted (crash, OOM kill, host reboot) sooner than
    ``CICD_AGENT_OFFLINE_AFTER`` never looked dead, so nobody else reruns them;
    and they would hold its slots forever. Run before the node consumes anything.
    """
    settings = load_settings()
    with db.session() as session:
        orphans = session.execute(
            select(TaskStatus.task_id, TaskStatus.attempt).where(
                TaskStatus.state == TaskState.RUNNING, TaskStatus.worker == node
            )
        ).all()
    return [
        task_id
        for task_id, attempt in orphans
        if _rerun(task_id, node, attempt, settings.max_attempts, "restarted")
    ]


def rerun_lost_build(task_id: int, node: str, attempt: int) -> bool:
    """A build running on a live ``node`` whose next stage message was lost: run it again."""
    return _rerun(task_id, node, attempt, load_settings().max_attempts, "lost its next stage")


def rerun_dropped_build(task_id: int, node: str, attempt: int) -> bool:
    """A stage the broker took back from ``node`` (its connection dropped: the node died or
    lost the broker) and gave to another: run the build again, unless that happened already."""
    return _rerun(task_id, node, attempt, load_settings().max_attempts,
                  "lost its broker connection")  # fmt: skip


def rerun_fenced_build(task_id: int, node: str, attempt: int) -> bool:
    """A build ``node`` stopped itself because its lease expired: run it again, unless another
    node's reaper already did."""
    return _rerun(task_id, node, attempt, load_settings().max_attempts,
                  "lost its connection to the database")  # fmt: skip


def _rerun(
    task_id: int, node: str, attempt: int, max_attempts: int,
    what: str = "stopped responding",
) -> bool:  # fmt: skip
    gave_up = attempt >= max_attempts
    reason = f"agent {node} {what} during the build (run {attempt} of {max_attempts})"
    with db.session() as session:
        if gave_up:
            claimed = lifecycle.give_up(session, task_id, attempt, node, f"{reason}; not rerun")
        else:
            claimed = lifecycle.requeue(session, task_id, attempt, node)
        if not claimed:
            return False
        note = f"{reason}; " + ("not run again" if gave_up else "running it again on any agent")
        # At the top of the next run's log: why there is one (or why there is none).
        line = f"\n*** {note} ***\n"
        session.add(TaskLog(task_id=task_id, stage=None, attempt=attempt + 1, content=line))
        if not gave_up:
            session.execute(delete(TaskStage).where(TaskStage.task_id == task_id))
        session.commit()
    log.warning("task %s: %s", task_id, note)
    if not gave_up:
        _send(task_id, attempt + 1)
    return True


def send_unsent_builds() -> list[int]:
    """Send builds the broker never took: a crash between commit and send, or a broker outage.

    After ``CICD_RECONCILE_AFTER``: the forge's redelivery of the webhook comes first.
    """
    settings = load_settings()
    with db.session() as session:
        waited = db.clock(session) - dt.timedelta(seconds=settings.reconcile_after)
        unsent = session.execute(
            select(TaskStatus.task_id, TaskStatus.attempt).where(
                TaskStatus.state.in_((TaskState.QUEUED, TaskState.FAILED)),
                TaskStatus.enqueued_at.is_(None),
            )
        ).all()
    sent = []
    for task_id, attempt in unsent:
        with db.session() as session:
            claimed = lifecycle.claim_unsent(session, task_id, recorded_before=waited)
            session.commit()
        if not claimed:
            continue
        if not _send(task_id, attempt):
            break  # the broker is down: the next sweep tries again
        log.warning("task %s: was recorded but never sent; sent it now", task_id)
        sent.append(task_id)
    return sent


#: How long a message may be in neither a queue nor the unacked hash while a node takes it.
LOST_RECHECK_SECONDS = 1.0


def resend_lost_builds() -> list[int]:
    """Send again builds that were sent but whose message the broker no longer holds.

    Redis's BRPOP hands a message to a connection that a cut link has made
    dead: Redis removed it from the queue, the node never got it. Such a build
    would stay ``queued`` forever. After ``CICD_RECONCILE_AFTER``, a queued
    build whose clone message is in no queue and in no node's hands (looked at
    twice, :data:`LOST_RECHECK_SECONDS` apart) is sent again. A copy that
    surfaced after all changes nothing: the first clone claims the build.
    """
    settings = load_settings()
    with db.session() as session:
        waited = db.clock(session) - dt.timedelta(seconds=settings.reconcile_after)
        waiting = session.execute(
            select(TaskStatus.task_id, TaskStatus.attempt, TaskStatus.enqueued_at).where(
                TaskStatus.state == TaskState.QUEUED, TaskStatus.enqueued_at < waited
            )
        ).all()
    if not waiting:
        return []
    queues = [BUILD_QUEUE, *(language_queue(language) for language in LANGUAGES)]
    missing = list(waiting)
    for look in range(2):
        if look:
            time.sleep(LOST_RECHECK_SECONDS)
        held = broker.messages_held(queues)
        if held is None:
            return []  # this broker cannot say
        missing = [row for row in missing if stage_task_id(row[0], "clone") not in held]
        if not missing:
            return []
    resent = []
    for task_id, attempt, enqueued_at in missing:
        with db.session() as session:
            if not lifecycle.claim_lost(session, task_id, attempt, enqueued_at):
                continue
            note = "\n*** the broker lost this build's message (a connection cut as it was "
            note += "delivered); sent it again ***\n"
            session.add(TaskLog(task_id=task_id, stage=None, attempt=attempt, content=note))
            session.commit()
        log.warning("task %s: the broker lost its message; sent it again", task_id)
        if _send(task_id, attempt):
            resent.append(task_id)
    return resent


def _send(task_id: int, attempt: int) -> bool:
    """Send the build's chain; if the broker cannot take it, it waits for the next sweep."""
    try:
        send_task(task_id, attempt)
    except BrokerUnavailable:
        return False
    return True
