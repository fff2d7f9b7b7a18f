"""Agent heartbeats: each worker node keeps its own ``agent_states`` row current.

Worker-side, not an event consumer: the node writes its row at start
(``worker_ready``), at every Celery heartbeat (``heartbeat_sent``, every 2 s
by default) and at a graceful stop (``worker_shutdown``). No extra process has
to run for the fleet to be visible, and a node that cannot reach the database
shows up as not heartbeating. A node that stops heartbeating (killed, host
down, network cut) is shown offline once its last heartbeat is older than
``CICD_AGENT_OFFLINE_AFTER``: readers compute that, nobody deletes rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from celery.worker.state import active_requests, all_total_count

from cicd import __version__, db
from cicd.models import AgentState, utcnow

__all__ = ["Node", "node", "record_heartbeat", "record_offline"]

log = logging.getLogger(__name__)


@dataclass
class Node:
    """This process's worker node, known once ``worker_ready`` fires."""

    hostname: str
    concurrency: int


node: Node | None = None


def _load_average() -> str | None:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return None


def record_heartbeat(current: Node, starting: bool = False) -> None:
    """Upsert this node's row: online, running builds, processed, load, version, now."""
    now = utcnow()
    values = {
        "online": True,
        "concurrency": current.concurrency,
        "active": len(active_requests),
        "processed": all_total_count[0],
        "loadavg": _load_average(),
        "sw_version": f"opscd {__version__}",
        "last_heartbeat": now,
    }
    try:
        with db.session() as session:
            row = session.get(AgentState, current.hostname)
            if row is None:
                row = AgentState(hostname=current.hostname, first_seen=now)
                session.add(row)
            for key, value in values.items():
                setattr(row, key, value)
            session.commit()
    except Exception:  # the node keeps building; its row just ages
        log.exception("%s: could not record its heartbeat", current.hostname)


def record_offline(current: Node) -> None:
    """A graceful stop: the node says it is gone, rather than waiting to be noticed."""
    try:
        with db.session() as session:
            row = session.get(AgentState, current.hostname)
            if row is not None:
                row.online, row.active, row.last_heartbeat = False, 0, utcnow()
                session.commit()
    except Exception:
        log.exception("%s: could not record going offline", current.hostname)
