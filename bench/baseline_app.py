"""The webhook baseline: a bare Flask endpoint that parses the JSON body and does one RPUSH.

Served by gunicorn with the same options as OpsCD's web process
(``gunicorn 'bench.baseline_app:create_app()'``), so the difference from
``POST /webhooks/gitlab`` is OpsCD's own work: token check, validation, rows
committed in MariaDB, the chain sent through Celery.
"""

from __future__ import annotations

import functools
import json
import os

import redis
from flask import Flask, Response, jsonify, request

__all__ = ["create_app", "QUEUE_KEY"]

QUEUE_KEY = "bench.baseline"


@functools.cache
def _client() -> redis.Redis:
    """One client (and connection pool) per process, made after gunicorn forks."""
    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/gitlab")
    def webhook() -> tuple[Response, int]:
        body = request.get_data()
        payload = json.loads(body)
        _client().rpush(QUEUE_KEY, body)
        return jsonify(queued=payload.get("after")), 202

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    return app
