"""The Celery app every OpsCD process shares: web (to send), workers (to run), Flower (to watch).

Start a worker node with ``celery -A workers.celery_app worker -n NAME@%h``.
Options come from :mod:`cicd.config` on first use (``add_defaults`` takes a
promise), so importing this module reads nothing and connects nowhere.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup
from kombu.transport import TRANSPORT_ALIASES

from cicd.config import Settings, load_settings

__all__ = [
    "app",
    "BUILD_QUEUE",
    "STAGE_TASKS",
    "FAST_FAIL_RETRY_POLICY",
    "celery_options",
    "language_queue",
]

#: The queue every build's first stage goes to; any node may take it.
BUILD_QUEUE = "opscd.builds"


def language_queue(language: str) -> str:
    """The queue of builds for one language, consumed only by agents that build it."""
    return f"{BUILD_QUEUE}.{language}"


#: Publish retries of a web request: two quick ones, then GitLab is told 503 and redelivers.
FAST_FAIL_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                          "interval_max": 0.5}  # fmt: skip

#: Celery task name of each stage, in the order a build runs them.
STAGE_TASKS = {"clone": "opscd.clone", "build": "opscd.build", "publish": "opscd.publish"}


def celery_options(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from OpsCD's settings; each option says why it is set."""
    settings.require("broker_url")
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
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
        },
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
        # (workers.redis_transport). Celery 6 turns this on by default, which
        # would cancel and redeliver every build in flight at each broker blip.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Every node also consumes its own queue, "<nodename>.dq2"; the clone
        # stage routes the rest of its chain there (the checkout is local).
        "worker_direct": True,
        # Backstop behind the executors' own timeouts: a stage stuck outside
        # its script (e.g. a hung git) is killed, never holds a slot forever.
        "task_time_limit": settings.max_build_timeout + settings.clone_timeout + 600,
        # Task events let Flower follow builds from the moment a worker takes
        # them. ("sent" events are off: one more Redis publish per webhook, and
        # OpsCD's own pages show queued builds.)
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
    }


@celeryd_after_setup.connect
def _consume_language_queues(sender: str, instance: Any, **_: Any) -> None:
    """Each node also takes builds handed on for the languages it builds (all, by default).

    Only nodes that take builds at all: one started with ``-Q other`` stays out.
    """
    from cicd.languages import LANGUAGES

    queues = instance.app.amqp.queues
    if queues.consume_from is not None and BUILD_QUEUE not in queues.consume_from:
        return
    for language in load_settings().languages or LANGUAGES:
        queues.select_add(language_queue(language))


# kombu finds a transport by the URL's scheme in TRANSPORT_ALIASES: "redis" (also
# rediss:// and redis+socket://) names kombu's Redis transport with the fixes that
# let a node with a build in flight outlive a broker restart. Done by name rather
# than with broker_transport so that URLs stay redis:// for Flower and the logs.
TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = "workers.redis_transport:Transport"

app = Celery(
    "opscd",
    include=["workers.stages.clone", "workers.stages.build", "workers.stages.publish"],
)
app.add_defaults(lambda: celery_options(load_settings()))

# Signal handlers must be connected in every worker process.
import workers.signals  # noqa: E402, F401
