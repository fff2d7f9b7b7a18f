"""A node's slots are builds, not stages: at most ``concurrency`` builds in flight per node.

A build is in flight on a node from the start of its clone to the end of its
last stage (a build waiting for approval holds no slot). Its stages are
separate Celery tasks, and between two of them the pool process is free, so
``worker_concurrency`` alone caps stages, not builds: the node would take the
next build from the shared queue while its own cloned builds wait for their
next stage in its direct queue. Two mechanisms keep the promise:

- **The claim (the guarantee).** A clone starts only by claiming a slot in
  the database: one transaction locks the node's ``agent_states`` row, counts
  its builds ``running`` and marks the build running there if fewer than
  ``concurrency`` are. A clone that finds the node full gives its message back
  to the shared queue (``Reject(requeue=True)``), for any node with a free slot.
- **The pause (so the claim rarely has to refuse).** The node's main process
  stops consuming the shared queues while the node is full and starts again
  when a slot frees. It counts again before every acknowledgement of a stage,
  that is before the acknowledgement frees a prefetch slot: a build's next
  stage, already in the direct queue by then, takes that slot, not a new build.
  Each Celery heartbeat (2 s) counts too, for builds that end elsewhere (a
  cancel from the web while a build waits between stages).
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any

from celery.worker.request import Request
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cicd import agents, db, lifecycle
from cicd.broker import node_queue
from cicd.models import AgentState, Stage, StageState, TaskStage, TaskState, TaskStatus, utcnow

__all__ = ["Claim", "Node", "StageRequest", "builds_in_flight", "claim_slot", "node"]

log = logging.getLogger(__name__)


class Claim(enum.Enum):
    """What a clone's claim of a slot found."""

    CLAIMED = "claimed"  #: the build runs here now
    FULL = "full"  #: the node has ``concurrency`` builds in flight: give the build back
    GONE = "gone"  #: the build was canceled, finished or rerun meanwhile: drop the message
    REFUSED = "refused"  #: this node's agent may not take builds (disabled, unregistered)


def builds_in_flight(session: Session, hostname: str, besides: int | None = None) -> int:
    """Builds ``running`` on the node (but ``besides``): what the agents page shows and
    the cap counts."""
    query = (
        select(func.count())
        .select_from(TaskStatus)
        .where(TaskStatus.state == TaskState.RUNNING, TaskStatus.worker == hostname)
    )
    if besides is not None:
        query = query.where(TaskStatus.task_id != besides)
    return session.scalar(query)


def claim_slot(task_id: int, attempt: int, hostname: str, concurrency: int) -> Claim:
    """Mark the build running on ``hostname`` if the node has a free slot (see module doc).

    The UPDATE of the node's row comes first: it locks the row (MariaDB,
    PostgreSQL) or the database (SQLite) until the commit, so two clones
    starting at once on one node count one after the other.
    """
    now = utcnow()
    lock_node = (
        update(AgentState).where(AgentState.hostname == hostname).values(concurrency=concurrency)
    )
    with db.session() as session:
        if not session.execute(lock_node).rowcount:
            # The node's first heartbeat has not been written yet. Several clones may
            # find that at once: the row is made outside this transaction (its gap
            # locks released first, so no deadlock), one insert wins, all then lock it.
            session.rollback()
            _create_node_row(hostname, concurrency)
            session.execute(lock_node)
        if agents.refusal(session, agents.identity(session)) is not None:
            session.commit()
            return Claim.REFUSED
        if builds_in_flight(session, hostname, besides=task_id) >= concurrency:
            session.commit()
            return Claim.FULL
        claimed = lifecycle.claim(session, task_id, attempt, hostname)
        if not claimed:
            session.commit()
            return Claim.GONE
        # The clone's row anew, by statements that see the latest rows (not this
        # transaction's snapshot: another node may have just deleted an older one).
        session.execute(
            delete(TaskStage).where(TaskStage.task_id == task_id, TaskStage.stage == Stage.CLONE)
        )
        session.add(TaskStage(task_id=task_id, stage=Stage.CLONE, state=StageState.RUNNING,
                              worker=hostname, started_at=now))  # fmt: skip
        session.commit()
        return Claim.CLAIMED


def _create_node_row(hostname: str, concurrency: int) -> None:
    try:
        with db.session() as session:
            now = db.clock(session)  # heartbeats are aged on the database's clock
            session.add(AgentState(hostname=hostname, concurrency=concurrency, first_seen=now,
                                   last_heartbeat=now))  # fmt: skip
            session.commit()
    except IntegrityError:  # another clone of this node made it first
        pass


class Node:
    """This worker node's slots, as its main process sees them.

    ``configure`` runs before the pool forks (``celeryd_after_setup``), so pool
    processes know the node's name and concurrency for :func:`claim_slot`;
    ``attach`` hands the main process the consumer it pauses and resumes.
    """

    def __init__(self) -> None:
        self.hostname: str | None = None
        self.concurrency = 0
        self._consumer: Any = None
        self._paused: list[str] = []
        self._quiet_until = 0.0
        #: Why the server lets this node take no builds (its heartbeat says), else None.
        self.refused: str | None = None

    def refuse(self, why: str | None) -> None:
        """Record, from the heartbeat thread, whether the node's agent may take builds."""
        if why != self.refused:
            if why:
                log.warning("%s: takes no new builds: %s", self.hostname, why)
            else:
                log.warning("%s: may take builds again", self.hostname)
        self.refused = why

    def configure(self, hostname: str, concurrency: int) -> None:
        self.hostname, self.concurrency = hostname, concurrency

    def attach(self, consumer: Any) -> None:
        self._consumer = consumer

    def _shared_queues(self) -> list[str]:
        """The queues this node consumes that other nodes consume too (all but its own)."""
        own = node_queue(self.hostname).name
        consuming = self._consumer.app.amqp.queues.consume_from or {}
        return [name for name in consuming if name != own]

    def rebalance(self) -> None:
        """Pause the shared queues if the node is full, resume them if not (main process only).

        A database that cannot answer leaves things as they are for a few
        seconds (the claim still guarantees the cap) rather than block the
        main process's event loop at every acknowledgement.
        """
        if self._consumer is None or self.hostname is None or time.monotonic() < self._quiet_until:
            return
        try:
            with db.session() as session:
                in_flight = builds_in_flight(session, self.hostname)
        except Exception as error:
            log.warning("%s: could not count its builds (%s)", self.hostname, error)
            self._quiet_until = time.monotonic() + 5
            return
        full = in_flight >= self.concurrency or self.refused is not None
        if full and not self._paused:
            self._paused = self._shared_queues()
            for queue in self._paused:
                self._call("cancel_task_queue", queue)
            why = self.refused or f"{in_flight} builds in flight"
            log.info("%s: %s, pausing %s", self.hostname, why, self._paused)
        elif not full and self._paused:
            queues, self._paused = self._paused, []
            for queue in queues:
                self._call("add_task_queue", queue)
            log.info("%s: %d builds in flight, resuming %s", self.hostname, in_flight, queues)

    def _call(self, method: str, queue: str) -> None:
        try:
            getattr(self._consumer, method)(queue)
        except Exception:  # e.g. no task consumer during a reconnect: its queues are kept
            log.debug("%s(%s) during a reconnect", method, queue, exc_info=True)


#: This process's node.
node = Node()


class StageRequest(Request):
    """The request class of the stage tasks: counts the node's builds before each ack."""

    def acknowledge(self) -> None:
        if not self.acknowledged:
            node.rebalance()
        super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged:
            node.rebalance()
        super().reject(requeue=requeue)
