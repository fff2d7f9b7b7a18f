"""The webhook's pre-built message (``cicd.broker.enqueue_build``) is the very message Celery's
own ``chain(clone, build, publish).apply_async`` sends, read back from a real Redis: a Celery
upgrade that changes its message makes this fail before a worker sees a strange one.
"""

from __future__ import annotations

import base64
import json
import uuid

import redis
from celery import chain

from cicd import broker
from cicd.config import Settings

#: What differs between two sends of one message by design: kombu's random delivery tag.
PER_SEND = ("delivery_tag",)


def _sent(client: redis.Redis, key: str) -> dict:
    raw = client.rpop(key)
    assert raw is not None, f"nothing was sent to {key}"
    message = json.loads(raw)
    for name in PER_SEND:
        message["properties"].pop(name, None)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_the_prebuilt_message_is_the_one_celerys_chain_sends(broker_url, opscd_env) -> None:
    prefix = opscd_env["CICD_BROKER_PREFIX"]
    broker.configure(Settings(broker_url=broker_url, broker_prefix=prefix,
                              database_url=opscd_env["CICD_DATABASE_URL"]))  # fmt: skip
    queue = f"opscd.test-messages-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    client = redis.Redis.from_url(broker_url)
    task_id, attempt = 424242, 3

    broker.enqueue_build(task_id, attempt, queue=queue)
    prebuilt = _sent(client, prefix + queue)

    signatures = [
        broker.app.signature(name, task_id=broker.stage_task_id(task_id, stage))
        for stage, name in broker.STAGE_TASKS.items()
    ]
    signatures[0].args = ({"task_id": task_id, "attempt": attempt},)
    chain(*signatures).apply_async(queue=queue, retry_policy=broker.FAST_FAIL_RETRY_POLICY)
    by_celery = _sent(client, prefix + queue)

    assert prebuilt == by_celery
    assert prebuilt["headers"]["task"] == "opscd.clone"
    assert prebuilt["body"][0] == [{"task_id": task_id, "attempt": attempt}]
    later = [stage["task"] for stage in reversed(prebuilt["body"][2]["chain"])]
    assert later == ["opscd.build", "opscd.publish"]
    client.delete(prefix + queue)
