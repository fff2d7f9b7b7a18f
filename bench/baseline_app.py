"""The webhook baselines: bare Flask endpoints under the same gunicorn options as OpsCD's web.

- :func:`create_app` parses the JSON body and does one RPUSH: the floor of any webhook
  receiver that queues work (``gunicorn 'bench.baseline_app:create_app()'``).
- :func:`create_durable_app` does the same after one INSERT committed in MariaDB (a row
  of its own table, ``bench_deliveries``, in the bench's database): the floor of a
  receiver that, like OpsCD, keeps every delivery before it answers. One PyMySQL
  connection per serving thread, made on its first request and kept.

So the difference from ``POST /webhooks/gitlab`` is OpsCD's own work: token check,
validation, its rows and the chain sent through Celery.
"""

from __future__ import annotations

import functools
import json
import os
import threading

import pymysql
import redis
from flask import Flask, Response, jsonify, request
from sqlalchemy.engine import make_url

__all__ = ["create_app", "create_durable_app", "QUEUE_KEY", "DURABLE_QUEUE_KEY", "DELIVERIES_DDL"]

QUEUE_KEY = "bench.baseline"
DURABLE_QUEUE_KEY = "bench.baseline.durable"
#: The durable baseline's table: what a receiver must keep to find a delivery again.
DELIVERIES_DDL = """
CREATE TABLE IF NOT EXISTS bench_deliveries (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  delivery VARCHAR(128) NOT NULL,
  project VARCHAR(255) NOT NULL,
  ref VARCHAR(255) NOT NULL,
  sha CHAR(40) NOT NULL,
  received_at DATETIME(6) NOT NULL,
  UNIQUE KEY delivery (delivery)
) ENGINE=InnoDB
"""
INSERT = (
    "INSERT INTO bench_deliveries (delivery, project, ref, sha, received_at)"
    " VALUES (%s, %s, %s, %s, UTC_TIMESTAMP(6))"
)

_local = threading.local()


@functools.cache
def _client() -> redis.Redis:
    """One client (and connection pool) per process, made after gunicorn forks."""
    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


def _connection() -> pymysql.Connection:
    """This thread's MariaDB connection (gthread threads live as long as their worker)."""
    connection = getattr(_local, "connection", None)
    if connection is None:
        url = make_url(os.environ["CICD_DATABASE_URL"])
        connection = pymysql.connect(
            host=url.host, port=url.port or 3306, user=url.username, password=url.password or "",
            database=url.database, charset="utf8mb4", autocommit=False,
        )  # fmt: skip
        _local.connection = connection
    return connection


def _app(durable: bool) -> Flask:
    app = Flask(__name__)
    queue = DURABLE_QUEUE_KEY if durable else QUEUE_KEY

    @app.post("/webhooks/gitlab")
    def webhook() -> tuple[Response, int]:
        body = request.get_data()
        payload = json.loads(body)
        if durable:
            connection = _connection()
            with connection.cursor() as cursor:
                cursor.execute(INSERT, (
                    request.headers.get("X-Gitlab-Event-UUID", ""),
                    payload["project"]["path_with_namespace"], payload["ref"], payload["after"],
                ))  # fmt: skip
            connection.commit()
        _client().rpush(queue, body)
        return jsonify(queued=payload.get("after")), 202

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    return app


def create_app() -> Flask:
    """Parse the JSON, one RPUSH."""
    return _app(durable=False)


def create_durable_app() -> Flask:
    """Parse the JSON, one INSERT committed in MariaDB, one RPUSH."""
    return _app(durable=True)
