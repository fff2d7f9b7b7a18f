"""The broker as a dimension: the same figures on Redis and on RabbitMQ, in one bench run.

:func:`node_kill`: a worker node SIGKILLed under a build, on the bench's own stack; the
time from the kill to the build running again on the other node (its next run holding a
slot there). On Redis the reaper reruns it once the node's heartbeats are overdue
(``CICD_AGENT_OFFLINE_AFTER``, 10 s by default, and its sweep every
``CICD_REAPER_INTERVAL``); on RabbitMQ the broker gives the dead node's stage back when
its connection drops, and the node's queue hands it to a live node (``cicd.broker.node_queue``).

:func:`rabbitmq`: a RabbitMQ node of the bench's own (free ports, its own data directory),
and a bench process of its own on it (``python -m bench --broker-url``) running the
dispatch, one-node pipeline and node-kill scenarios, whose results are returned; the
Redis figures are the same scenarios of this run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.services import ROOT
from bench.stack import Stack
from bench.stats import spread
from cicd import processes
from tests.support.processes import wait_until
from tests.support.services import PrivateRabbitMQ

__all__ = ["node_kill", "rabbitmq", "AMQP_SETTINGS"]

#: What an installation on a RabbitMQ node with its default consumer_timeout (30 min) must
#: say: no stage may outlive it (10 + 5 + 10 minutes at most).
AMQP_SETTINGS = {"CICD_BROKER_CONSUMER_TIMEOUT": "1800", "CICD_MAX_BUILD_TIMEOUT": "600",
                 "CICD_CLONE_TIMEOUT": "300"}  # fmt: skip

#: How long the build runs on its node before the kill: past the node queue's dead-letter
#: delay (``cicd.broker.NODE_QUEUE_TTL_SECONDS``), as any build longer than a few seconds.
RUNNING_BEFORE_KILL = 8.0


def _running_on(stack: Stack, task_id: int) -> tuple[str, int] | None:
    rows = stack.sql(
        "SELECT s.worker, s.attempt FROM task_states s JOIN task_stages g ON g.task_id ="
        " s.task_id AND g.stage = 'build' AND g.state = 'running' WHERE s.task_id = %s AND"
        " s.state = 'running'",
        (task_id,),
    )
    return (rows[0][0], rows[0][1]) if rows else None


def _one_kill(stack: Stack, url: str, session: requests.Session, body: bytes) -> float:
    task_id = int(stack.post(session, url, body)["task_id"])
    started = wait_until(lambda: _running_on(stack, task_id), 60, "the build to start", 0.02)
    worker, attempt = started
    time.sleep(RUNNING_BEFORE_KILL)
    victim = worker.split("@")[0]
    stack.processes[victim].stop(signal.SIGKILL)  # the node and its pool: a host lost
    killed = time.time()

    def claimed_elsewhere() -> bool:
        rows = stack.sql(
            "SELECT worker, attempt FROM task_states WHERE task_id = %s AND state = 'running'",
            (task_id,),
        )
        return bool(rows) and rows[0][1] > attempt and not rows[0][0].startswith(victim + "@")

    wait_until(claimed_elsewhere, 120, "the build to run again on the other node", 0.02)
    again = time.time() - killed
    session.post(f"{url}/api/tasks/{task_id}/cancel", headers={"X-Requested-With": "bench"},
                 timeout=10)  # fmt: skip
    stack.stop(victim)
    return again


def node_kill(stack: Stack, runs: int) -> dict[str, Any]:
    """Kill → the build running again on the other node, ``runs`` times, on this stack's
    broker, with the default offline bound and reaper interval."""
    url = stack.web("web-opscd", processes.WEB_APP)
    body = stack.payload("sleep")
    session = requests.Session()
    samples = []
    for _ in range(runs):
        stack.nodes("kill", processes.WORKER_APP, 2)  # (again) both nodes, idle
        samples.append(round(_one_kill(stack, url, session, body), 3))
    stack.stop_nodes()
    return {
        "broker": "rabbitmq" if stack.broker_url.startswith("amqp") else "redis",
        "running_before_kill_s": RUNNING_BEFORE_KILL,
        "runs": samples,
        "summary": {"again_s": spread(samples)},
    }


def rabbitmq(plan_name: str, runs: int, log: Any) -> dict[str, Any]:
    """The dispatch, one-node pipelines and node-kill scenarios on a RabbitMQ node of the
    bench's own, measured by a bench process of their own; its results."""
    with tempfile.TemporaryDirectory(prefix="opscd-bench-rabbitmq-") as base:
        node = PrivateRabbitMQ(Path(base) / "node").start()
        output = Path(base) / "results.json"
        try:
            args = [sys.executable, "-m", "bench", "--broker-url", node.url, "--nodes", "1",
                    "--runs", str(runs), "--output", str(output),
                    "--only", "dispatch", "pipelines", "node_kill"]  # fmt: skip
            if plan_name == "smoke":
                args.append("--smoke")
            log(f"RabbitMQ node {node.name} on port {node.port}: a bench process of its own")
            subprocess.run(args, cwd=ROOT, check=True)
        finally:
            node.stop()
        found = json.loads(output.read_text())
    return {"scenarios": found["scenarios"], "meta": found["meta"]}
