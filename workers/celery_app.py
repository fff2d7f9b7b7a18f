"""The worker node's Celery app: the shared app (:mod:`cicd.broker`) with the stage tasks
and the signal handlers.

Start a node with ``celery -A workers.celery_app worker -n NAME@%h`` (the
Procfile's ``worker``). Only worker processes import this module: the web
process and Flower use :mod:`cicd.broker` and run none of the handlers.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.signals import celeryd_after_setup
from celery.worker.consumer import Consumer as CeleryConsumer

from cicd import broker, db
from cicd.broker import BUILD_QUEUE, app, language_queue
from cicd.config import load_settings
from cicd.languages import LANGUAGES

__all__ = ["app", "settings", "Consumer"]

#: Seconds between two attempts to reach a broker that went away.
RECONNECT_INTERVAL = 1.0

#: The node's settings, read once as the worker starts (a bad value stops it here);
#: the worker's modules get this same object from the cached ``load_settings()``.
settings = load_settings()
settings.check_shell_isolation()
db.configure(settings)
broker.configure(settings)


class Consumer(CeleryConsumer):
    """Celery's consumer, trying to reconnect every second while the broker is away.

    Celery's own backs off to 30 s between attempts, so a node would go on
    taking no builds for up to half a minute after the broker came back.
    Without native delayed delivery: on quorum queues (RabbitMQ) Celery would
    declare its 28 levels of delay exchanges and queues at every start, for
    ETA tasks, which OpsCD never sends.
    """

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps
                         if not step.endswith(":DelayedDelivery")]  # fmt: skip

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=RECONNECT_INTERVAL, interval_step=1,
            interval_max=RECONNECT_INTERVAL,
        )  # fmt: skip
        return super().ensure_connected(conn)


app.conf.worker_consumer = f"{__name__}:Consumer"


@celeryd_after_setup.connect
def _consume_language_queues(sender: str, instance: Any, **_: Any) -> None:
    """Each node also takes builds handed on for the languages it builds (all, by default).

    Only nodes that take builds at all: one started with ``-Q other`` stays out.
    The node's own queue is declared as :func:`cicd.broker.node_queue` says (on
    RabbitMQ, with its dead-lettering), not as Celery's plain ``worker_direct``.
    """
    queues = instance.app.amqp.queues
    own = broker.node_queue(sender)
    if own.name in (queues.consume_from or {}):
        queues.select_add(own)
    if queues.consume_from is not None and BUILD_QUEUE not in queues.consume_from:
        return
    for language in settings.languages or LANGUAGES:
        # Declared as a sender that does not consume it declares it (a quorum queue on
        # RabbitMQ): two declarations of one queue must agree, or RabbitMQ refuses one.
        queues.select_add(queues.new_missing(language_queue(language)))


# The stage tasks register themselves with the app; the signal handlers connect.
import workers.signals  # noqa: E402
import workers.stages.build  # noqa: E402
import workers.stages.clone  # noqa: E402
import workers.stages.publish  # noqa: E402, F401
