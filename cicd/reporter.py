"""The reporter: the control-plane process that posts commit statuses to the forges.

Run it as ``celery -A cicd.reporter worker --pool solo`` (the Procfile's
``reporter``): it consumes the statuses queue only, whatever ``-Q`` says.
Agents only record statuses (:mod:`cicd.statuses`); the reporter decrypts a
project's token and posts them, so a slow or absent forge never holds a build's
slot, and statuses are posted by one place whose clock and network reach the
forge. Its Celery task is a wake-up sent after each
commit that recorded statuses; a thread of this process does the delivering,
so wake-ups that arrive together make one pass, and it looks on its own
every :data:`POLL_INTERVAL` seconds, which delivers what a lost wake-up, a
restart of this process or of the broker left behind. Reporters on several
hosts may run at once: each status is claimed before it is posted.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from cicd import broker, db, statuses
from cicd.broker import REPORT_TASK, STATUS_QUEUE, app
from cicd.config import load_settings

__all__ = ["app", "report_statuses", "POLL_INTERVAL"]

log = logging.getLogger(__name__)

#: Longest a recorded status waits when no wake-up reached this process.
POLL_INTERVAL = 5.0

settings = load_settings()
db.configure(settings)
broker.configure(settings)
_wake = threading.Event()
_stop = threading.Event()


@app.task(name=REPORT_TASK, ignore_result=True, acks_late=False)
def report_statuses() -> None:
    """Statuses were recorded: deliver them now."""
    _wake.set()


def _deliver_forever() -> None:
    while not _stop.is_set():
        _wake.clear()
        try:
            due_in = statuses.deliver_due(settings)
        except Exception:  # the database away: look again soon
            log.exception("delivering commit statuses failed")
            due_in = 1.0
        wait = POLL_INTERVAL if due_in is None else min(POLL_INTERVAL, max(due_in, 0.05))
        _wake.wait(wait)


@celeryd_after_setup.connect
def _consume_the_statuses_queue(sender: str, instance: Any, **_: Any) -> None:
    instance.app.amqp.queues.select([STATUS_QUEUE])


@worker_ready.connect
def _start(**_: Any) -> None:
    threading.Thread(target=_deliver_forever, name="statuses", daemon=True).start()


@worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    _stop.set()
    _wake.set()
