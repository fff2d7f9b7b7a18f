"""The worker node's Celery app: the shared app (:mod:`cicd.broker`) with the stage tasks
and the signal handlers.

Start a node with ``celery -A workers.celery_app worker -n NAME@%h`` (the
Procfile's ``worker``). Only worker processes import this module: the web
process and Flower use :mod:`cicd.broker` and run none of the handlers.
"""

from __future__ import annotations

from typing import Any

from celery.signals import celeryd_after_setup

from cicd import broker, db
from cicd.broker import BUILD_QUEUE, app, language_queue
from cicd.config import load_settings
from cicd.languages import LANGUAGES

__all__ = ["app", "settings"]

#: The node's settings, read once as the worker starts (a bad value stops it here);
#: the worker's modules get this same object from the cached ``load_settings()``.
settings = load_settings()
db.configure(settings)
broker.configure(settings)


@celeryd_after_setup.connect
def _consume_language_queues(sender: str, instance: Any, **_: Any) -> None:
    """Each node also takes builds handed on for the languages it builds (all, by default).

    Only nodes that take builds at all: one started with ``-Q other`` stays out.
    """
    queues = instance.app.amqp.queues
    if queues.consume_from is not None and BUILD_QUEUE not in queues.consume_from:
        return
    for language in settings.languages or LANGUAGES:
        queues.select_add(language_queue(language))


# The stage tasks register themselves with the app; the signal handlers connect.
import workers.signals  # noqa: E402
import workers.stages.build  # noqa: E402
import workers.stages.clone  # noqa: E402
import workers.stages.publish  # noqa: E402, F401
