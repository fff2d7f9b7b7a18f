"""kombu's Redis transport, with the two fixes a node needs to outlive a broker restart.

:mod:`cicd.broker` names this class as kombu's ``redis`` transport (for
``redis://``, ``rediss://`` and ``redis+socket://`` brokers, in every OpsCD
process); it is kombu's own transport in every other respect.

kombu 5.7.0 (the latest release) crashes a worker that holds an unacknowledged
message when Redis goes away: Celery's consumer ``collect()``\\s the lost
connection, which clears the transport's ``client``; closing the channel
afterwards restores the unacknowledged messages and builds a new connection
pool from ``transport.client`` → ``AttributeError: 'NoneType' object has no
attribute 'hostname'`` in ``_connparams``, which is no connection error, so
the consumer gives up ("Unrecoverable error") and the process exits. The ack
of the running stage, once it ends, takes the same path. Upstream:
https://github.com/celery/kombu/issues/582 and
https://github.com/celery/kombu/issues/970.

1. A channel whose connection was collected keeps the connection parameters it
   was made with, so its restore and its acks reach Redis through a fresh pool
   (or fail with a connection error, which kombu and Celery handle). Redis
   keeps unacknowledged messages in one hash for every channel, so the ack of a
   stage that ends after the reconnect removes it there: nothing is delivered
   again.
2. A channel that closes does not put back the messages of stages this node is
   still running (Celery keeps running them across a lost connection): put
   back, another node would run the same stage a second time. Only messages
   the node reserved but never started are restored; those it could not
   restore while Redis was down are restored by the next channel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from celery.worker.state import active_requests
from kombu.transport import redis

__all__ = ["Transport", "Channel", "message_ids"]

log = logging.getLogger(__name__)

#: Seconds between redis-py's own PINGs of an idle connection (kombu's default interval).
REDIS_PY_HEALTH_CHECK = 25

#: Delivery tags a closing channel could not put back (Redis down); the next channel does.
_left_to_restore: set[str] = set()


def _running_tags() -> set[str]:
    """Delivery tags of the messages whose stage runs in this node right now."""
    tags = set()
    for request in list(active_requests):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


class QoS(redis.QoS):
    """Restores only what no pool process of this node is running (fix 2)."""

    def restore_unacked(self, client: Any = None) -> None:
        running = _running_tags()
        tags = [tag for tag in self._delivered if tag not in running]
        kept = len(self._delivered) - len(tags)
        if kept:
            log.info("keeping %d unacknowledged message(s) of running stages", kept)
        try:
            with self.channel.conn_or_acquire(client) as connected:
                for tag in tags:
                    self.restore_by_tag(tag, client=connected)
        except self.channel.connection_errors:
            _left_to_restore.update(tags)
            log.warning("broker unreachable: %d reserved message(s) wait for the reconnect",
                        len(tags))  # fmt: skip
        self._delivered.clear()


class Channel(redis.Channel):
    """Keeps its connection parameters (fix 1) and restores what a lost channel left."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made_with = dict(super()._connparams())
        self._restore_left_behind()

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            # Collected after a lost connection, or closed: such a channel only
            # restores and acks, through a plain (synchronous) pool.
            return dict(self._made_with)
        params = super()._connparams(asynchronous=asynchronous)
        if "health_check_interval" in params:
            # kombu's own checks of the consuming connection keep the transport's short
            # interval; redis-py's would PING before every command on a connection idle
            # that long (a fifth of a trivial build's cost), and socket_timeout already
            # bounds those commands.
            params["health_check_interval"] = REDIS_PY_HEALTH_CHECK
        return params

    def _restore_left_behind(self) -> None:
        while _left_to_restore:
            tag = _left_to_restore.pop()
            try:
                self.qos.restore_by_tag(tag)
            except self.connection_errors:
                _left_to_restore.add(tag)
                return


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def message_ids(channel: Channel, queues: Iterable[str]) -> set[str]:
    """Celery task ids of the messages Redis holds for ``queues``: waiting in their lists, or
    delivered to any node and not yet acknowledged (kombu's unacked hash).

    A message popped by a node whose connection was cut as Redis answered is in
    neither: BRPOP removed it, and the node never received it to record it.
    """
    prefix = channel.global_keyprefix or ""
    client = channel.client
    raw: list[bytes] = []
    for queue in queues:
        for priority in channel.priority_steps:
            raw += client.execute_command("LRANGE", prefix + channel._q_for_pri(queue, priority),
                                          0, -1)  # fmt: skip
    messages = [_decoded(entry) for entry in raw]
    for entry in client.execute_command("HVALS", prefix + channel.unacked_key):
        delivered = _decoded(entry)  # [message, exchange, routing key]
        messages.append(delivered[0] if isinstance(delivered, list) and delivered else None)
    return {
        str(message["headers"]["id"])
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("headers"), dict)
        and message["headers"].get("id")
    }  # fmt: skip


def _decoded(entry: bytes) -> Any:
    try:
        return json.loads(entry)
    except ValueError:
        return None
