"""Celery's own figures, on the same broker: a tiny app whose tasks do (almost) nothing.

Run as ``celery -A bench.noop_app worker -n NAME@%h -c 3``. Its Celery options
are those of ``cicd/broker.py`` (acks late, prefetch 1, JSON, task
events, worker_direct), so what OpsCD adds is its own code, not a different
Celery configuration. Tasks report when they ran by an RPUSH to the same
Redis database (there is no result backend).

- ``bench.stamp``: publish-to-start latency (the time it started, beside the
  time it was sent).
- ``bench.noop`` x 2 then ``bench.done``: a raw chain of three no-op tasks.
- ``bench.work_clone`` → ``bench.work_build`` → ``bench.work_publish``: the same
  work as an OpsCD build of ``script: true`` (git fetch of one commit over
  HTTP, ``sh`` run, folder removed) without OpsCD's bookkeeping.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

__all__ = ["app", "stamp", "noop", "done", "work_clone", "work_build", "work_publish"]

QUEUE = "bench.noop"
STAMPS_KEY = "bench:stamps"
DONE_KEY = "bench:done"

#: Where the tasks report (RPUSH), whatever the broker is.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")

app = Celery("bench")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER_URL") or REDIS_URL,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3600 * 5, "socket_connect_timeout": 2},
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_direct=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.stamp")
def stamp(sent_at: float) -> None:
    """Record when this task started, beside when it was sent."""
    _redis().rpush(STAMPS_KEY, json.dumps([sent_at, time.time()]))


@app.task(name="bench.noop")
def noop(value: Any = None) -> Any:
    return value


@app.task(name="bench.done")
def done(value: Any = None) -> None:
    """Last link of a chain: record when the chain ended."""
    _redis().rpush(DONE_KEY, repr(time.time()))


def _git(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=env,
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
    )


@app.task(name="bench.work_clone")
def work_clone(ctx: dict[str, Any]) -> dict[str, Any]:
    """Fetch one commit over HTTP into a fresh folder, with the git commands OpsCD's clone runs."""
    workspace = Path(tempfile.mkdtemp(prefix="work-", dir=ctx["root"]))
    checkout = workspace / "src"
    checkout.mkdir()
    (workspace / "home").mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workspace / "home"),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_COUNT": "2",
        "GIT_CONFIG_KEY_0": "protocol.version",
        "GIT_CONFIG_VALUE_0": "2",
        "GIT_CONFIG_KEY_1": "http.extraHeader",
        "GIT_CONFIG_VALUE_1": ctx["authorization"],
    }
    _git(["init", "-q"], checkout, env)
    _git(["remote", "add", "origin", ctx["url"]], checkout, env)
    _git(["fetch", "-q", "--no-tags", "--depth=1", "origin", ctx["sha"]], checkout, env)
    _git(
        ["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", ctx["sha"]], checkout, env
    )
    return {**ctx, "workspace": str(workspace)}


@app.task(name="bench.work_build")
def work_build(ctx: dict[str, Any]) -> dict[str, Any]:
    """Run the build script with ``sh`` in the checkout."""
    subprocess.run(
        ["/bin/sh", "-c", "set -e\nprintf '%s\\n' '$ true'\ntrue\n"],
        cwd=Path(ctx["workspace"]) / "src",
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ctx


@app.task(name="bench.work_publish")
def work_publish(ctx: dict[str, Any]) -> None:
    """Nothing to publish: remove the folder and record when the chain ended."""
    shutil.rmtree(ctx["workspace"], ignore_errors=True)
    _redis().rpush(DONE_KEY, repr(time.time()))


def use_broker(url: str) -> None:
    """Run on ``url``, with OpsCD's options for that broker (on RabbitMQ: quorum queues and
    publisher confirms, as ``cicd.broker`` sets them). Before the first task is sent: a bench
    process measures one broker (``python -m bench --broker-url``)."""
    app.conf.broker_url = url
    if url.startswith(("amqp", "pyamqp")):
        app.conf.update(task_default_queue_type="quorum", task_create_missing_queue_type="quorum",
                        broker_transport_options={"confirm_publish": True})  # fmt: skip


if os.environ.get("BENCH_BROKER_URL"):
    use_broker(os.environ["BENCH_BROKER_URL"])
