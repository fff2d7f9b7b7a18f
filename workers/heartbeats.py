"""Agent heartbeats: each worker node keeps its own ``agent_states`` row current.

Worker-side, not an event consumer, and not tied to the broker: a thread of
the node's main process (:class:`Heartbeat`) writes the row every 2 seconds
(:func:`workers.lease.heartbeat_interval`) straight to the database, from
``worker_ready`` to a graceful stop (``worker_shutdown``, which marks the node offline at once).
Celery's own heartbeats stop while the broker is away, and a node that cannot
reach the broker is not a dead node: its builds go on and must not be run
again elsewhere. A node that stops heartbeating (killed, host down, database
unreachable from it) is shown offline once its last heartbeat is older than
``CICD_AGENT_OFFLINE_AFTER``: readers compute that, nobody deletes rows.

Each heartbeat that gets through renews the node's lease on its builds
(:mod:`workers.lease`): a node whose heartbeats stop reaching the database
stops its builds before any other node may run them again. Heartbeats carry
the database's clock (:func:`cicd.db.clock`), never the agent's.

The heartbeat also says whether the node has a broker connection: without
one it takes no builds (it receives no messages), and its row says since when
(``broker_lost_at``, shown on the agents page), but it is not dead: its builds
go on and are not run again.

A second thread runs the reaper (:mod:`workers.reaper`), so that a slow sweep
never delays the lease, but only once the node's own heartbeats have reached
the database for a whole ``CICD_AGENT_OFFLINE_AFTER`` (right after a database
outage every node's row is old, and none of them is dead), and only while its
broker connection is up (a rerun is sent through it).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from celery.worker.state import active_requests, all_total_count, reserved_requests
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import DBAPIError

from cicd import __version__, agents, db
from cicd.config import load_settings
from cicd.models import AgentState, TaskState, TaskStatus, utcnow
from workers import capacity, lease, reaper

__all__ = [
    "CELERY_HEARTBEAT", "Beat", "Heartbeat", "Node", "record_heartbeat", "record_and_renew",
    "record_offline",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Seconds between two of Celery's own heartbeats (sent through the broker).
CELERY_HEARTBEAT = 2.0


#: Seconds between two reads of what the node may do (its agent enabled, agents registered):
#: a disabled agent's nodes stop taking builds within this (its clones' claims refuse it
#: at once), and the other heartbeats are one UPDATE each.
WHO_AM_I_EVERY = 6.0


@dataclass
class Node:
    """A worker node, as its heartbeats describe it, and what its last read of
    :data:`cicd.agents.WHO_AM_I` said (the agent's name, enabled, any registered) and when."""

    hostname: str
    concurrency: int
    who: tuple[str | None, bool, bool] | None = field(default=None, compare=False)
    who_read_at: float = field(default=0.0, compare=False)
    #: What the last row written said that the node knows without asking (builds it
    #: processed and runs, its broker connection), and when it was written (monotonic).
    written: tuple[int, int, bool] | None = field(default=None, compare=False)
    written_at: float = field(default=0.0, compare=False)


class Beat(enum.Enum):
    """What one heartbeat did."""

    WRITTEN = "written"  # the row reached the database: the lease is renewed
    SKIPPED = "skipped"  # nothing changed and the row is recent: nothing sent
    FAILED = "failed"  # the database did not take it (logged)


def _load_average() -> str | None:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return None


def record_heartbeat(
    current: Node, broker_up: bool = True, touch_every: float | None = None
) -> Beat:
    """Write this node's row: online, builds in flight, processed, load, version, now (the
    database's), which registered agent's login wrote it, and since when the broker is
    unreachable if ``broker_up`` is false.

    One UPDATE that computes what it can in the database (the count, the
    clock, the login's agent), committed as it runs: 200 agents make 100
    heartbeats a second. What the node may do comes back with it on
    PostgreSQL (RETURNING), and from one read more every
    :data:`WHO_AM_I_EVERY` seconds on MariaDB; the node's first heartbeat
    inserts its row. With ``touch_every``, a heartbeat
    when nothing the node knows of changed and the row is younger than that
    sends nothing (:func:`workers.lease.touch_interval`: the lease is renewed
    all the same before it runs out). A failure is logged, never raised.
    """
    known = _known_state(broker_up)
    due_to_read = current.who is None or time.monotonic() - current.who_read_at >= WHO_AM_I_EVERY
    if (
        touch_every is not None
        and known is not None
        and known == current.written
        # Half a second early: the next heartbeat (2 s on) would be too late for the touch.
        and time.monotonic() - current.written_at < touch_every - 0.5
        and not due_to_read
    ):
        return Beat.SKIPPED
    for attempt in (1, 2):
        try:
            sent = time.monotonic()
            name, enabled, registered = _write_heartbeat(current, broker_up)
            current.written, current.written_at = known, sent
            break
        except DBAPIError as error:
            if attempt == 1 and error.connection_invalidated:
                continue  # a pooled connection the server dropped: once more, on a new one
            log.error("%s: could not record its heartbeat (%s)", current.hostname, error)
        except Exception as error:  # the node keeps building; its row just ages
            log.error("%s: could not record its heartbeat (%s)", current.hostname, error)
        current.who, current.written = None, None  # read again: an outage may be a revoke
        return Beat.FAILED
    capacity.node.refuse(agents.refusal_of(name, bool(enabled), bool(registered)))
    return Beat.WRITTEN


def _known_state(broker_up: bool) -> tuple[int, int, bool] | None:
    held = _held_builds()
    return None if held is None else (all_total_count[0], len(held), broker_up)


def _write_heartbeat(current: Node, broker_up: bool) -> tuple[str | None, bool, bool]:
    with db.autocommit_engine().connect() as connection:
        account = {"account": db.login(connection)}
        # PostgreSQL says what the node may do in the UPDATE's own answer (RETURNING);
        # MariaDB cannot, and is asked every WHO_AM_I_EVERY seconds.
        returning = connection.dialect.update_returning
        due = current.who is None or time.monotonic() - current.who_read_at >= WHO_AM_I_EVERY
        if due and not returning:
            current.who = tuple(connection.execute(agents.WHO_AM_I, account).one())
            current.who_read_at = time.monotonic()
        now = db.now_in_sql(connection.dialect.name)
        values = {
            "online": True,
            "concurrency": current.concurrency,
            "processed": all_total_count[0],
            "loadavg": _load_average(),
            "sw_version": f"opscd {__version__}",
            "active": _IN_FLIGHT.where(TaskStatus.worker == current.hostname).scalar_subquery(),
            "agent": agents.WHO_AM_I_COLUMNS[0],
            "last_heartbeat": now,
            "broker_lost_at": None if broker_up else func.coalesce(AgentState.broker_lost_at,
                                                                   now),
        }  # fmt: skip
        statement = update(AgentState).where(AgentState.hostname == current.hostname)
        if returning:
            statement = statement.returning(*agents.WHO_AM_I_COLUMNS)
        result = connection.execute(statement.values(values), account)
        if returning:
            row = result.first()
            written = row is not None
            if written:
                current.who, current.who_read_at = tuple(row), time.monotonic()
        else:
            written = bool(result.rowcount)
        if not written:  # the node's first heartbeat
            connection.execute(insert(AgentState).values(
                {**values, "hostname": current.hostname, "first_seen": now,
                 "broker_lost_at": None if broker_up else now}), account)  # fmt: skip
            current.who = tuple(connection.execute(agents.WHO_AM_I, account).one())
            current.who_read_at = time.monotonic()
    return current.who


#: The builds running on a node, counted in the heartbeat's UPDATE (the agents page's figure).
_IN_FLIGHT = (
    select(func.count()).select_from(TaskStatus).where(TaskStatus.state == TaskState.RUNNING)
)


def record_and_renew(
    current: Node, broker_up: bool = True, touch_every: float | None = None
) -> bool:
    """:func:`record_heartbeat`, and renew the node's lease if it reached the database; False
    if it failed (a heartbeat that sent nothing leaves the lease as it is)."""
    sent = time.monotonic()  # before the write: the database records it later
    beat = record_heartbeat(current, broker_up, touch_every)
    if beat is Beat.WRITTEN:
        lease.renew(sent, lease.lease_length(load_settings()))
    return beat is not Beat.FAILED


def record_offline(current: Node) -> None:
    """A graceful stop: the node says it is gone, rather than waiting to be noticed."""
    try:
        with db.session() as session:
            row = session.get(AgentState, current.hostname)
            if row is not None:
                row.online, row.active, row.last_heartbeat = False, 0, db.clock(session)
                session.commit()
    except Exception:
        log.exception("%s: could not record going offline", current.hostname)


def _held_builds() -> set[int] | None:
    """Builds this node holds a stage message of (running or reserved), or None if unknown."""
    try:
        requests = [*active_requests, *reserved_requests]
    except RuntimeError:  # changed while read by the main thread: ask again next time
        return None
    held = set()
    for request in requests:
        parts = str(getattr(request, "id", "")).split("-")
        if len(parts) == 3 and parts[0] == "opscd" and parts[1].isdigit():
            held.add(int(parts[1]))
    return held


class Heartbeat(threading.Thread):
    """The node's heartbeat thread: its row every few seconds, its lease, then the reaper."""

    def __init__(self, node: Node) -> None:
        super().__init__(name=f"opscd-heartbeat-{node.hostname}", daemon=True)
        self.node = node
        self.interval = lease.heartbeat_interval(load_settings())
        self.touch_every = lease.touch_interval(load_settings())
        self._stopped = threading.Event()
        self._sweep_due = threading.Event()
        #: Since when (monotonic) every heartbeat reached the database; None after a failure.
        self._healthy_since: float | None = None
        #: Since when Celery's own heartbeats (broker connected) came without a gap.
        self._broker_since: float | None = None
        self._broker_last = time.monotonic()  # the node just connected to start
        self._broker_was_up = True
        #: Builds running here by the database with no message on this node, since when.
        self._missing: dict[int, float] = {}

    def broker_seen(self) -> None:
        """Celery sent a heartbeat: the node's broker connection is up (main thread)."""
        now = time.monotonic()
        if self._broker_since is None or now - self._broker_last > 3 * CELERY_HEARTBEAT:
            self._broker_since = now
        self._broker_last = now

    def broker_connected(self) -> bool:
        """Whether Celery's heartbeats (which travel through the broker) came lately."""
        return time.monotonic() - self._broker_last <= 3 * CELERY_HEARTBEAT

    def broker_up(self) -> bool:
        """:meth:`broker_connected`, saying so in the log when that changes (heartbeat thread)."""
        silent = time.monotonic() - self._broker_last
        up = self.broker_connected()
        if up != self._broker_was_up:
            if up:
                log.warning("%s: the broker is reachable again; taking builds", self.node.hostname)
            else:
                since = (utcnow() - dt.timedelta(seconds=silent)).strftime("%H:%M:%S UTC")
                log.warning(
                    "%s: broker unreachable since %s; taking no new builds until it "
                    "is back (builds running here go on)",
                    self.node.hostname,
                    since,
                )
            self._broker_was_up = up
        return up

    def rerun_lost_builds(self) -> list[int]:
        """Builds ``running`` here that no stage message of this node carries any more.

        Between two stages a build's next message is in the node's own queue; the
        Redis transport can lose one that it popped as the connection broke (the
        pop and the unacked entry are two commands). Such a build would stay
        running, and hold a slot, forever: after ``CICD_AGENT_OFFLINE_AFTER``
        without a message while the broker connection was up the whole time, it
        runs again on any node (attempt + 1), as a dead node's build does.
        """
        held = _held_builds()
        now = time.monotonic()
        if held is None or self._broker_since is None or not self.broker_connected():
            self._missing.clear()  # the broker is away: messages cannot arrive
            return []
        with db.session() as session:
            running = dict(
                session.execute(
                    select(TaskStatus.task_id, TaskStatus.attempt).where(
                        TaskStatus.state == TaskState.RUNNING,
                        TaskStatus.worker == self.node.hostname,
                    )
                ).all()
            )
        self._missing = {
            task_id: self._missing.get(task_id, max(now, self._broker_since))
            for task_id in running
            if task_id not in held
        }
        bound = load_settings().agent_offline_after
        lost = [task_id for task_id, since in self._missing.items() if now - since >= bound]
        return [task_id for task_id in lost if reaper.rerun_lost_build(
            task_id, self.node.hostname, running[task_id])]  # fmt: skip

    def beat(self) -> None:
        """One heartbeat and the lease it renews; the reaper's sweep once the database
        answered long enough and the broker connection is up."""
        broker_up = self.broker_up()
        if not record_and_renew(self.node, broker_up, self.touch_every):
            self._healthy_since = None
            return
        now = time.monotonic()
        if self._healthy_since is None:
            self._healthy_since = now
        if now - self._healthy_since >= load_settings().agent_offline_after and broker_up:
            self._sweep_due.set()

    def run(self) -> None:
        threading.Thread(target=self._sweep, name=f"{self.name}-reaper", daemon=True).start()
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                self.beat()
            except Exception:
                log.exception("%s: heartbeat failed", self.node.hostname)
            self._stopped.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _sweep(self) -> None:
        """The reaper, on a thread of its own: a slow sweep must not delay the lease."""
        while not self._stopped.is_set():
            if not self._sweep_due.wait(timeout=1):
                continue
            self._sweep_due.clear()
            try:
                reaper.sweep()
                self.rerun_lost_builds()
            except Exception:
                log.exception("%s: reaper failed", self.node.hostname)

    def stop(self) -> None:
        """Stop beating (a graceful shutdown), then say the node is offline."""
        self._stopped.set()
        self._sweep_due.set()
        self.join(timeout=10)
        record_offline(self.node)
