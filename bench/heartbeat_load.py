"""Simulated agents: fake worker nodes heartbeating into ``agent_states`` through OpsCD's own code.

``python -m bench.heartbeat_load --first 0 --agents 50 --total 200 ...`` calls
:func:`workers.heartbeats.record_heartbeat` for agents ``first`` to
``first + agents - 1``, each every ``interval`` seconds, their phases spread
evenly over the interval across all ``total`` agents (as independent nodes
would be), from ``start-at`` for ``seconds``, after one unmeasured heartbeat
each (the row exists, the connections are open), as a node's heartbeat thread
does (a heartbeat that finds nothing changed writes only every
``workers.lease.touch_interval``). Prints one JSON line: heartbeats, rows
written, errors, write latencies and how late heartbeats started against
their schedule.
Several such processes stand for many hosts; a thread pool per process
stands for the nodes' own concurrency.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["main"]


class _ErrorCounter(logging.Handler):
    """``record_heartbeat`` logs (rather than raises) a failed write: count those."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--total", type=int, required=True)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--start-at", type=float, required=True, help="epoch seconds")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    from cicd import db
    from cicd.config import load_settings
    from workers import lease
    from workers.heartbeats import Beat, Node, record_heartbeat

    db.configure(load_settings())  # as a worker node does at its start
    touch_every = lease.touch_interval(load_settings())  # as a node's heartbeat thread

    errors = _ErrorCounter()
    logging.getLogger("workers.heartbeats").addHandler(errors)
    nodes = [Node(f"simagent{args.first + i:04d}@bench", 3) for i in range(args.agents)]
    latencies: list[float] = []  # of the heartbeats that wrote the row
    lateness: list[float] = []
    lock = threading.Lock()

    def beat(index: int, due: float) -> None:
        started = time.time()
        done = record_heartbeat(nodes[index], touch_every=touch_every)
        took = time.time() - started
        with lock:
            if done is Beat.WRITTEN:
                latencies.append(took)
            lateness.append(started - due)

    # Before the clock starts: each agent's row exists and the connection pool is warm.
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(record_heartbeat, nodes))

    end = args.start_at + args.seconds
    schedule = [
        (args.start_at + (args.first + i) * args.interval / args.total, i)
        for i in range(args.agents)
    ]
    heapq.heapify(schedule)
    with ThreadPoolExecutor(args.threads) as pool:
        while schedule:
            due, index = heapq.heappop(schedule)
            if due >= end:
                break
            time.sleep(max(0.0, due - time.time()))
            pool.submit(beat, index, due)
            heapq.heappush(schedule, (due + args.interval, index))
    print(
        json.dumps(
            {
                "calls": len(lateness),
                "written": len(latencies),
                "errors": errors.count,
                "latency": latencies,
                "lateness": lateness,
            }
        )
    )


if __name__ == "__main__":
    main()
