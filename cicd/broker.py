"""The broker contract both sides share: the Celery app, its queues, the stage names, sending.

The web process sends builds with this app; each worker node runs it with the
stage tasks and the signal handlers added (``workers.celery_app``), and
Flower watches it. Only names and plain JSON travel through the broker: the
web sends a stage by its task name and never imports the worker's code.
Options come from :mod:`cicd.config` on first use (``add_defaults`` takes a
promise), so importing this module reads nothing and connects nowhere.

Callers commit the task's rows first, then call :func:`send_task`; only ids and
plain dicts travel through the broker (JSON), never ORM objects. A task the
broker did not take is marked failed with ``enqueued_at`` empty, so it never
sits ``queued`` forever and a redelivery of its webhook can send it again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import MessageNacked
from celery import Celery
from celery.app.amqp import task_message
from celery.utils.nodenames import worker_direct
from kombu import Queue
from kombu.exceptions import KombuError
from kombu.transport import TRANSPORT_ALIASES
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from cicd import db, lifecycle, redis_transport
from cicd.config import Settings, load_settings
from cicd.errors import OpsCDError
from cicd.lifecycle import BROKER_DOWN

__all__ = [
    "app",
    "configure",
    "BUILD_QUEUE",
    "STAGE_TASKS",
    "FAST_FAIL_RETRY_POLICY",
    "celery_options",
    "language_queue",
    "node_queue",
    "NODE_QUEUE_TTL_SECONDS",
    "BrokerUnavailable",
    "BROKER_DOWN",
    "send_task",
    "enqueue_build",
    "revoke_build",
    "messages_held",
    "send_publish",
    "stage_task_id",
    "STATUS_QUEUE",
    "REPORT_TASK",
    "wake_reporter",
]

#: What a send raises when the broker did not take the message: unreachable (Redis, RabbitMQ),
#: or RabbitMQ refused it (a publisher confirm's nack: a queue over its limit, say).
SEND_ERRORS = (KombuError, RedisError, OSError, MessageNacked)

#: The queue every build's first stage goes to; any node may take it.
BUILD_QUEUE = "opscd.builds"


#: Seconds a stage may wait, not yet delivered, in its node's own queue on RabbitMQ: the
#: node takes it at once (its own queue is never paused), so one still there this long
#: after it was sent, or given back by RabbitMQ when the node's connection dropped, is
#: dead-lettered to the build queue, where any node reruns the build (:func:`node_queue`).
NODE_QUEUE_TTL_SECONDS = 5


def node_queue(hostname: str) -> Queue:
    """A node's own queue (Celery's ``worker_direct``), where a build's stages after its clone
    go: the checkout is on that node's disk.

    On RabbitMQ the queue dead-letters what expires in it into the build queue:
    an unacknowledged stage goes back to its queue the moment its node's
    connection drops (a node killed, a host lost), where only that node would
    ever take it; expired, it reaches a live node, which runs the build again
    (``workers.stages.StageTask``) within seconds, without waiting for the
    reaper. On Redis the reaper does that (a dead node's heartbeats stop).
    """
    queue = worker_direct(hostname)
    if _configured is None or _configured.broker_kind != "amqp":
        return queue
    arguments = {
        "x-message-ttl": NODE_QUEUE_TTL_SECONDS * 1000,
        "x-dead-letter-exchange": "",  # the default exchange: routed by queue name
        "x-dead-letter-routing-key": BUILD_QUEUE,
    }
    return Queue(queue.name, queue.exchange, queue.routing_key, queue_arguments=arguments)


def language_queue(language: str) -> str:
    """The queue of builds for one language, consumed only by agents that build it."""
    return f"{BUILD_QUEUE}.{language}"


#: Publish retries of a web request: two quick ones, then GitLab is told 503 and redelivers.
FAST_FAIL_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                          "interval_max": 0.5}  # fmt: skip

#: The reporter's queue and task (``cicd.reporter``): a wake-up to post commit statuses.
STATUS_QUEUE = "opscd.statuses"
REPORT_TASK = "opscd.report_statuses"

#: Celery task name of each stage, in the order a build runs them.
STAGE_TASKS = {"clone": "opscd.clone", "build": "opscd.build", "publish": "opscd.publish"}


def _redis_options(settings: Settings) -> dict[str, Any]:
    """Redis: it redelivers after a timeout; OpsCD's transport watches its connections."""
    return {
        "broker_transport_options": {
            # Redis redelivers an unacknowledged message after this many seconds.
            # With acks_late a stage is acknowledged when it ends, so this must
            # exceed the longest build or a running build is delivered twice.
            "visibility_timeout": settings.broker_visibility_timeout,
            # How often a node looks for such messages of dead nodes to restore:
            # every ~10 s (kombu's default is ~100 s), sooner with a short timeout.
            "unacked_restore_interval": max(1, min(10, settings.broker_visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            "global_keyprefix": settings.broker_prefix,
            # The webhook must answer within GitLab's few seconds even when the
            # broker is unreachable: fail the connect fast and answer 503.
            "socket_connect_timeout": 2,
            # A broker that vanished without closing the connection (a cut link, a
            # firewall) is noticed in seconds, not half a minute: a send gives up
            # after socket_timeout (so a webhook still answers 503 within GitLab's
            # 10 s), and a node drops a BRPOP connection whose reply is overdue by
            # health_check_interval (kombu's default: 25 s), then reconnects.
            "socket_timeout": 2,
            "socket_keepalive": True,
            "health_check_interval": 2,
        },
    }


def _amqp_options(settings: Settings) -> dict[str, Any]:
    """RabbitMQ: durable quorum queues, publisher confirms, and a redelivery that needs no
    timeout (an unacknowledged message goes back the moment its consumer's connection drops)."""
    return {
        # Every queue OpsCD declares (the build queue, the language queues) is a quorum
        # queue: on disk, replicated in a cluster, and it survives the loss of a node.
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "broker_transport_options": {
            # A send returns only once RabbitMQ has the message (publisher confirms): the
            # webhook's 202 means the broker has it, or the send fails and it answers 503.
            "confirm_publish": True,
        },
        # The webhook must answer within GitLab's few seconds when RabbitMQ is away.
        "broker_connection_timeout": 2,
        # A connection whose peer vanished (a host lost, a cut link) is noticed by both
        # sides within seconds (Celery's default: 2 min): RabbitMQ then gives the dead
        # node's unacknowledged stages to others, and a node reconnects.
        "broker_heartbeat": 10,
    }


def celery_options(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from OpsCD's settings; each option says why it is set."""
    settings.require("broker_url")
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        **(_amqp_options(settings) if settings.broker_kind == "amqp" else _redis_options(settings)),
        # A worker handing a build to its next stage waits out a broker restart
        # (about two minutes) rather than drop the chain. The web process does
        # not wait: it sends with FAST_FAIL_RETRY_POLICY and answers 503.
        "task_publish_retry_policy": {
            "max_retries": 30,
            "interval_start": 0.5,
            "interval_step": 1,
            "interval_max": 5,
        },
        # Stages report through task_states (signals), not a result backend.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": BUILD_QUEUE,
        # At most this many builds run at once on one node (CICD_WORKER_CONCURRENCY).
        "worker_concurrency": settings.worker_concurrency,
        # Reserve no more than the node runs, so a queued build waits in Redis
        # where an idle node can take it, not in a busy node's prefetch buffer.
        "worker_prefetch_multiplier": 1,
        # Acknowledge a stage only when it ends, and requeue it if its pool
        # process dies: a build is never lost with a crashed process. Risk: a
        # stage may run twice, so every stage starts from a clean state.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A lost broker connection does not stop the stages that run: the build
        # goes on and its acknowledgement reaches Redis after the reconnect
        # (cicd.redis_transport). Celery 6 turns this on by default, which
        # would cancel and redeliver every build in flight at each broker blip.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Every node also consumes its own queue, "<nodename>.dq2"; the clone
        # stage routes the rest of its chain there (the checkout is local).
        "worker_direct": True,
        # Backstop behind the executors' own timeouts: a stage stuck outside
        # its script (e.g. a hung git) is killed, never holds a slot forever.
        "task_time_limit": settings.stage_time_limit,
        # Task events let Flower follow builds from the moment a worker takes
        # them. ("sent" events are off: one more Redis publish per webhook, and
        # OpsCD's own pages show queued builds.)
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
    }


# kombu finds a transport by the URL's scheme in TRANSPORT_ALIASES: "redis" (also
# rediss:// and redis+socket://) names kombu's Redis transport with the fixes that
# let a node with a build in flight outlive a broker restart. Done by name rather
# than with broker_transport so that URLs stay redis:// for Flower and the logs.
TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = "cicd.redis_transport:Transport"

app = Celery("opscd")
_configured: Settings | None = None
# OpsCD's own processes call configure(); Flower (``-A cicd.broker``) has nothing
# to configure the app with, so an app never configured reads the environment.
app.add_defaults(lambda: celery_options(_configured or load_settings()))


def configure(settings: Settings) -> None:
    """Point the app at ``settings``' broker, before the first message is sent."""
    global _configured
    _configured = settings
    if app.configured:
        app.conf.update(celery_options(settings))


class BrokerUnavailable(OpsCDError):
    """The broker could not take the build; nothing was sent."""


def stage_task_id(task_id: int, stage: str) -> str:
    """Celery task id of one stage of one build: stable, so a stage can be found and revoked."""
    return f"opscd-{task_id}-{stage}"


def enqueue_build(task_id: int, attempt: int = 1, queue: str = BUILD_QUEUE) -> None:
    """Send the build's chain; any node consuming ``queue`` takes the clone stage.

    The message is the one ``chain(clone, build, publish).apply_async(queue=queue)``
    sends, filled into a template (:func:`_chain_message`) instead of built by
    Celery's canvas for every build; it goes out through Celery's own sender
    (routing, queue declaration, publish signals, ``FAST_FAIL_RETRY_POLICY``).
    """
    message = _chain_message(task_id, attempt)
    try:
        with (
            app.producer_or_acquire() as producer,
            producer.connection._reraise_as_library_errors(),
        ):
            app.amqp.send_task_message(producer, STAGE_TASKS["clone"], message, queue=queue,
                                       retry_policy=FAST_FAIL_RETRY_POLICY)  # fmt: skip
    except SEND_ERRORS as error:
        raise BrokerUnavailable(f"could not send build {task_id} to the broker: {error}") from None


@dataclass(frozen=True)
class _Template:
    """What every build's clone message has in common, made once per process by Celery."""

    headers: dict[str, Any]
    link: dict[str, Any]  # the message body's third part: callbacks, errbacks, chain, chord
    later: tuple[dict[str, Any], ...]  # the signatures of the stages after clone, in order


@functools.cache
def _template(_pid: int) -> _Template:
    """Celery's protocol-2 message of a clone stage and the signatures of the later stages,
    with the build's ids left to fill in; one per process (``pid``: the ``origin`` header
    names the sending process, and a forked child is another)."""
    stages = list(STAGE_TASKS.items())
    message = app.amqp.create_task_message("", stages[0][1], (), {}, chain=[], ignore_result=None)
    later = tuple(dict(app.signature(name)) for _stage, name in stages[1:])
    return _Template(headers=message.headers, link=message.body[2], later=later)


def _chain_message(task_id: int, attempt: int) -> Any:
    """The clone stage's message of one build: ids-only args, the later stages embedded in
    reverse (the order Celery pops them in), each with its stable id and this thread's
    ``reply_to``, as ``chain(...).apply_async`` makes it."""
    template = _template(os.getpid())
    reply_to = app.thread_oid
    first = stage_task_id(task_id, "clone")
    root_id, parent_id = first, None
    parent = app.current_worker_task  # sent from within a stage: that stage is the parent
    if parent is not None:
        root_id, parent_id = parent.request.root_id or parent.request.id, parent.request.id
    args = ({"task_id": task_id, "attempt": attempt},)
    later = [
        {
            **_copied(signature),
            "options": {"task_id": stage_task_id(task_id, stage), "reply_to": reply_to},
        }
        for stage, signature in zip(list(STAGE_TASKS)[1:], template.later, strict=True)
    ]
    headers = {**_copied(template.headers), "id": first, "root_id": root_id, "parent_id": parent_id,
               "argsrepr": repr(args)}  # fmt: skip
    properties = {"correlation_id": first, "reply_to": reply_to}
    body = (args, {}, {**template.link, "chain": later[::-1]})
    return task_message(headers=headers, properties=properties, body=body, sent_event=None)


def _copied(mapping: dict[str, Any]) -> dict[str, Any]:
    """A template's part for one message: its lists and dicts copied too, so that nothing
    done to one message (a publish signal's receiver) reaches the next."""
    return {key: value.copy() if isinstance(value, dict | list) else value
            for key, value in mapping.items()}  # fmt: skip


def send_task(task_id: int, attempt: int = 1, session: Session | None = None) -> None:
    """Enqueue a committed task and record the outcome; raises :class:`BrokerUnavailable`.

    The outcome is :func:`cicd.lifecycle.sent`, or :func:`~cicd.lifecycle.unsent`
    (the one broker-down policy: failed, sent again by a redelivery or the
    reconciler). ``session``: the caller's, to record it without a second checkout.
    """
    try:
        enqueue_build(task_id, attempt)
    except BrokerUnavailable:
        _record(lifecycle.unsent, task_id, session)
        raise
    _record(lifecycle.sent, task_id, session)


def send_publish(task_id: int, node: str, ctx: dict) -> None:
    """Send an approved build's publish stage to the node that holds its workspace."""
    signature = app.signature(
        STAGE_TASKS["publish"], args=(ctx,), task_id=stage_task_id(task_id, "publish")
    )
    try:
        signature.apply_async(queue=node_queue(node), retry_policy=FAST_FAIL_RETRY_POLICY)
    except SEND_ERRORS as error:
        raise BrokerUnavailable(f"could not send publish of {task_id}: {error}") from None


def wake_reporter() -> None:
    """Tell the reporter that commit statuses were recorded (best effort: it also looks every
    few seconds, so a wake-up the broker did not take only delays them)."""
    try:
        app.send_task(REPORT_TASK, queue=STATUS_QUEUE, retry=False)
    except SEND_ERRORS:
        pass


def messages_held(queues: list[str]) -> set[str] | None:
    """Stage ids of every message the broker holds for ``queues`` (waiting or delivered and not
    acknowledged), or None if this broker cannot say. Raises :class:`BrokerUnavailable`."""
    try:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            if not isinstance(channel, redis_transport.Channel):
                return None
            return redis_transport.message_ids(channel, queues)
    except SEND_ERRORS as error:
        raise BrokerUnavailable(f"could not look into the broker's queues: {error}") from None


def revoke_build(task_id: int) -> None:
    """Tell every worker to drop the build's stages still in the queue (best effort).

    Workers keep revoked ids in memory only; the stages also check the task's
    state before they start, so a canceled build never runs even without this.
    """
    try:
        app.control.revoke([stage_task_id(task_id, stage) for stage in STAGE_TASKS])
    except SEND_ERRORS:
        pass


def _record(transition: Callable[[Session, int], bool], task_id: int,
            session: Session | None) -> None:  # fmt: skip
    def once() -> None:
        with nullcontext(session) if session is not None else db.session() as current:
            try:
                transition(current, task_id)
                current.commit()
            except BaseException:
                current.rollback()
                raise

    db.retry_conflicts(once, f"task {task_id}: recording it {transition.__name__}")
