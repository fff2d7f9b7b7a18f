"""Prometheus metrics of the web process at ``/metrics``, read from the database and the broker.

Computed at each scrape rather than counted in memory: the web runs as several
gunicorn processes, and builds happen on other hosts, so the database and the
broker are the only places that know the whole fleet.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import kombu
import redis
from amqp.exceptions import ChannelError
from flask import Blueprint, Response, current_app
from kombu.exceptions import KombuError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, literal_column, select
from sqlalchemy.sql.elements import ColumnElement

from cicd import db
from cicd.broker import BUILD_QUEUE, language_queue
from cicd.config import Settings
from cicd.languages import LANGUAGES
from cicd.models import AgentState, StepState, TaskState, TaskStatus, TaskStep

__all__ = ["bp", "BUCKETS"]

bp = Blueprint("metrics", __name__)

#: Build duration buckets in seconds, from a quick script to a long release build.
BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


def _duration_seconds(dialect: str) -> ColumnElement[float]:
    """Seconds between start and finish, in the database's own date arithmetic."""
    if dialect in ("mysql", "mariadb"):
        return (
            func.timestampdiff(
                literal_column("MICROSECOND"), TaskStatus.started_at, TaskStatus.finished_at
            )
            / 1_000_000.0
        )
    if dialect == "postgresql":
        return func.extract("epoch", TaskStatus.finished_at - TaskStatus.started_at)
    return (
        func.julianday(TaskStatus.finished_at) - func.julianday(TaskStatus.started_at)
    ) * 86400.0


class OpsCDCollector(Collector):
    """Builds by state, build durations, queue length, agents online."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        settings = self.settings
        engine = db.engine()
        duration = _duration_seconds(engine.dialect.name)
        finished = TaskStatus.finished_at.is_not(None) & TaskStatus.started_at.is_not(None)
        with db.session() as session:
            by_state = dict(
                session.execute(
                    select(TaskStatus.state, func.count()).group_by(TaskStatus.state)
                ).all()
            )
            histogram = session.execute(
                select(
                    *[func.sum(case((duration <= bound, 1), else_=0)) for bound in BUCKETS],
                    func.count(),
                    func.sum(duration),
                ).where(finished, TaskStatus.state.in_([TaskState.SUCCESS, TaskState.FAILED]))
            ).one()
            agents = session.execute(select(AgentState.online, AgentState.last_heartbeat)).all()
            steps = dict(
                session.execute(select(TaskStep.state, func.count()).group_by(TaskStep.state)).all()
            )
            now = db.clock(session)

        builds = GaugeMetricFamily("opscd_builds", "Builds by state", labels=["state"])
        for state in TaskState:
            builds.add_metric([state.value], by_state.get(state, 0))
        yield builds

        by_step = GaugeMetricFamily(
            "opscd_steps", "Steps of the builds' current runs by state", labels=["state"]
        )
        for state in StepState:
            by_step.add_metric([state.value], steps.get(state, 0))
        yield by_step

        *counts, total, seconds = histogram
        buckets = [(str(b), int(c or 0)) for b, c in zip(BUCKETS, counts, strict=True)]
        buckets.append(("+Inf", int(total or 0)))
        yield HistogramMetricFamily(
            "opscd_build_duration_seconds",
            "Duration of finished builds, from the first stage's start to the end",
            buckets=buckets,
            sum_value=float(seconds or 0),
        )

        online = sum(
            1
            for is_online, last in agents
            if is_online and (now - last).total_seconds() <= settings.agent_offline_after
        )
        yield GaugeMetricFamily("opscd_agents_online", "Worker nodes heartbeating", value=online)
        yield GaugeMetricFamily("opscd_agents", "Worker nodes ever seen", value=len(agents))

        queue = GaugeMetricFamily(
            "opscd_queue_length", "Builds waiting in a broker queue", labels=["queue"]
        )
        for name, length in _queue_lengths(settings):
            queue.add_metric([name], length)
        yield queue


def _queue_lengths(settings: Settings) -> list[tuple[str, int]]:
    """Messages waiting in each build queue (Redis lists, RabbitMQ queues), or nothing when
    the broker cannot be asked."""
    broker_url, prefix = settings.broker_url or "", settings.broker_prefix
    names = [BUILD_QUEUE, *(language_queue(language) for language in LANGUAGES)]
    if settings.broker_kind == "amqp":
        return _amqp_queue_lengths(broker_url, names)
    if broker_url.startswith("redis+socket://"):
        broker_url = "unix://" + broker_url.removeprefix("redis+socket://")
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return []
    try:
        client = redis.Redis.from_url(broker_url, socket_connect_timeout=1, socket_timeout=2)
        with client.pipeline() as pipe:
            for name in names:
                pipe.llen(prefix + name)
            return list(zip(names, pipe.execute(), strict=True))
    except redis.RedisError:
        return []


def _amqp_queue_lengths(broker_url: str, names: list[str]) -> list[tuple[str, int]]:
    """A passive declare of each queue tells its ready messages; one not declared yet (no node
    consumed it so far) has none."""
    lengths = []
    try:
        with kombu.Connection(broker_url, connect_timeout=1) as connection:
            for name in names:
                channel = connection.channel()
                try:
                    lengths.append((name, channel.queue_declare(name, passive=True).message_count))
                except ChannelError:  # no such queue: RabbitMQ closed this channel
                    lengths.append((name, 0))
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
    except (KombuError, OSError):
        return []
    return lengths


#: A scrape's answer is reused this long: the counts scan task_states, and any number of
#: scrapers (or a flood of /metrics requests) then costs one scan per interval per process.
CACHE_SECONDS = 5.0


class _Cached:
    """The last rendered answer of one process, made by one request at a time."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(OpsCDCollector(settings))
        self.lock = threading.Lock()
        self.made_at = -CACHE_SECONDS
        self.body = b""

    def render(self) -> bytes:
        with self.lock:
            if time.monotonic() - self.made_at >= CACHE_SECONDS:
                self.body, self.made_at = generate_latest(self.registry), time.monotonic()
            return self.body


@bp.get("/metrics")
def metrics() -> Response:
    cached = current_app.extensions.get("opscd_metrics")
    if cached is None:
        cached = current_app.extensions.setdefault(
            "opscd_metrics", _Cached(current_app.config["SETTINGS"])
        )
    return Response(cached.render(), mimetype=CONTENT_TYPE_LATEST)
