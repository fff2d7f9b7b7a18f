"""The bench's own OpsCD: database, broker database, git server, web processes and worker nodes.

:class:`Stack` sets everything up in :meth:`Stack.start` and removes all of it
in :meth:`Stack.close` (processes stopped, database dropped, Redis database
flushed, temporary folder removed), whatever happened in between.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import requests

from bench.services import (
    ROOT,
    BenchRepo,
    CountingGitServer,
    MySQL,
    Process,
    ensure_services,
    make_repo,
    start_web,
    start_worker,
    tree_pss,
    tree_rss,
    wait_ready,
)
from tests.support.gitlab import gitlab_headers, gitlab_payload

__all__ = ["Stack", "RssSampler", "PUSH_FIXTURE", "epoch"]

PUSH_FIXTURE = "push-event.json"  # in tests/fixtures/gitlab
GIT_USER = "bench-bot"
FINISHED = ("success", "failed", "canceled")


def epoch(value: dt.datetime | None) -> float | None:
    """A naive UTC timestamp from the database as epoch seconds."""
    return None if value is None else value.replace(tzinfo=dt.UTC).timestamp()


class RssSampler:
    """Samples the memory of process trees in a thread: RSS every 0.2 s, PSS every second.

    ``peak`` is the highest RSS (each process's resident pages, so pages shared
    after a fork count once per process), ``peak_pss`` the highest PSS (shared
    pages divided among the processes sharing them).
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.2) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0)
        self.peak_pss = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for tick in itertools.count():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], tree_rss(pid))
                if tick % 5 == 0:
                    self.peak_pss[name] = max(self.peak_pss[name], tree_pss(pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


class Stack:
    """Everything one bench run needs, on loopback; ``close()`` removes it all."""

    def __init__(
        self, redis_db: int, log: Callable[[str], None], broker_url: str | None = None,
        **settings: str,
    ) -> None:  # fmt: skip
        """``broker_url``: another broker than the Redis database (RabbitMQ), with the
        ``settings`` it needs; Redis still carries the bench's own reports."""
        self.log = log
        self.mysql = MySQL.from_environment()
        self.redis_url = f"redis://127.0.0.1:6379/{redis_db}"
        self.broker_url = broker_url or self.redis_url
        self.extra_settings = settings
        self.tmp = Path(tempfile.mkdtemp(prefix="opscd-bench-"))
        self.log_dir = self.tmp / "logs"
        self.log_dir.mkdir()
        self.secret = ""  # the bench project's webhook secret, once registered
        self.git_password = "bench-git-" + uuid.uuid4().hex[:12]
        self.database: str | None = None
        self.processes: dict[str, Process] = {}
        self.web_urls: dict[str, str] = {}
        self._stops: list[Callable[[], None]] = []
        self._git_server: Any = None
        self.repo: BenchRepo | None = None
        self.clone_url = ""
        self.env: dict[str, str] = {}
        self.settings: Any = None
        self.redis = redis.Redis.from_url(self.redis_url)
        self._db_connection: Any = None

    # -- set up and tear down ---------------------------------------------------------------

    def start(self) -> None:
        self._stops += ensure_services(self.mysql, self.redis_url, self.tmp)
        self.redis.flushdb()
        self.database = self.mysql.create_database()
        self.log(f"database {self.database}, broker {self.broker_url}, files in {self.tmp}")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CICD_")}
        self.env.update(
            CICD_DATABASE_URL=self.mysql.url(self.database),
            CICD_BROKER_URL=self.broker_url,
            CICD_GIT_USERNAME=GIT_USER,
            CICD_GIT_PASSWORD=self.git_password,
            CICD_WORKSPACE_DIR=str(self.tmp / "workspaces"),
            CICD_CACHE_DIR=str(self.tmp / "cache"),  # mirrors and dependency caches: this run's
            CICD_EXECUTOR="shell",
            CICD_SHELL_UNSAFE="1",  # the bench runs as root, with nothing worth stealing
            BENCH_REDIS_URL=self.redis_url,
            BENCH_BROKER_URL=self.broker_url,
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            **self.extra_settings,
        )
        # This process runs OpsCD's code too (schema, the web app in-process, raw chains):
        # configured with the settings the child processes get, not through os.environ.
        from bench import noop_app
        from cicd import broker, db
        from cicd.config import settings_from

        self.settings = settings_from(self.env)
        db.configure(self.settings)
        broker.configure(self.settings)
        db.migrate()
        noop_app.use_broker(self.broker_url)

        self._git_server = CountingGitServer(self.tmp / "git", GIT_USER, self.git_password)
        self._git_server.start()
        self.repo = make_repo(self._git_server.root)
        self.clone_url = self._git_server.repo_url(self.repo.path)
        from cicd import projects

        self.secret = projects.register(self.repo.path, self.clone_url).webhook_secret

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        if self._git_server is not None:
            self._git_server.stop()
        if self._db_connection is not None:
            self._db_connection.close()
        if self.database:
            self.mysql.drop_database(self.database)
        try:
            self.redis.flushdb()
        except redis.RedisError:
            pass
        for stop in reversed(self._stops):
            stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- processes ------------------------------------------------------------------------

    def web(self, name: str, app: str) -> str:
        """A gunicorn serving ``app`` (Procfile options); its base URL."""
        if name not in self.processes:
            self.log(f"starting {name} (gunicorn {app})")
            process, url = start_web(name, app, self.env, self.log_dir)
            self.processes[name], self.web_urls[name] = process, url
        return self.web_urls[name]

    def nodes(
        self, prefix: str, app: str, count: int, env: dict[str, str] | None = None
    ) -> list[Process]:
        """Worker nodes ``<prefix>1..<count>`` of ``app`` running (started if not yet);
        ``env``: settings of theirs on top of the bench's (an executor, a cache folder)."""
        names = [f"{prefix}{i}" for i in range(1, count + 1)]
        new = [
            start_worker(name, app, {**self.env, **(env or {})}, self.log_dir)
            for name in names
            if name not in self.processes
        ]
        if new:
            self.log(f"starting worker node(s) {', '.join(p.name for p in new)} of {app}")
        for process in new:
            self.processes[process.name] = process
        wait_ready(new)
        return [self.processes[name] for name in names]

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            process.stop()
        self.web_urls.pop(name, None)

    def stop_nodes(self) -> None:
        for name in [n for n in self.processes if not n.startswith("web")]:
            self.stop(name)

    # -- the build's inputs -----------------------------------------------------------------

    def payload(self, branch: str = "main") -> bytes:
        """GitLab's recorded push payload, pointed at the bench repository's ``branch``."""
        sha = self.repo.shas[branch]
        ref = f"refs/heads/{branch}"
        payload = gitlab_payload(PUSH_FIXTURE, self.clone_url, self.repo.path, ref, sha)
        return json.dumps(payload).encode()

    def headers(self, secret: str | None = None) -> dict[str, str]:
        """A push delivery's headers (the bench project's secret unless another project's is
        given), with a delivery id never used before."""
        return gitlab_headers(secret or self.secret)

    def push_body(self, project: str, clone_url: str, sha: str, branch: str = "main") -> bytes:
        """GitLab's recorded push payload for any project's ``branch`` at ``sha``."""
        payload = gitlab_payload(PUSH_FIXTURE, clone_url, project, f"refs/heads/{branch}", sha)
        return json.dumps(payload).encode()

    def post(self, session: requests.Session, url: str, body: bytes) -> dict[str, Any]:
        response = session.post(
            url + "/webhooks/gitlab", data=body, headers=self.headers(), timeout=10
        )
        if response.status_code != 202:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text}")
        return response.json()

    @property
    def git_server(self) -> CountingGitServer:
        """The git server every bench project is cloned from (it counts the bytes it sends)."""
        return self._git_server

    @property
    def git_authorization(self) -> str:
        """The header git sends to the bench's git server (``http.extraHeader``)."""
        return self._git_server.auth_header

    # -- the bench's database ---------------------------------------------------------------

    def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        """One query on the bench database (own autocommit connection, not OpsCD's)."""
        if self._db_connection is None:
            self._db_connection = self.mysql.connect(self.database)
        with self._db_connection.cursor() as cursor:
            cursor.execute(query, args)
            return list(cursor.fetchall())

    def wait_finished(
        self, first: int, last: int, expected: int, timeout: float, poll: float = 0.05
    ) -> dict:
        """Wait until ``expected`` tasks of ids ``first..last`` finished; states, last finish."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql(
                "SELECT state, COUNT(*), MAX(finished_at) FROM task_states "
                "WHERE task_id BETWEEN %s AND %s GROUP BY state",
                (first, last),
            )
            states = {state: count for state, count, _ in rows}
            finished = sum(states.get(state, 0) for state in FINISHED)
            if finished >= expected:
                last_finish = max(epoch(at) for state, _, at in rows if state in FINISHED)
                return {"states": states, "last_finished": last_finish}
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks {first}..{last} not finished in {timeout}s: {states}")
            time.sleep(poll)

    def broker_queue_length(self, queue: str) -> int:
        return int(self.redis.llen(queue))

    def purge(self, *keys: str) -> None:
        if keys:
            self.redis.delete(*keys)

    def discard_builds(self, queue: str) -> None:
        """Drop the builds waiting in ``queue`` and mark them canceled: a worker's reaper would
        otherwise find them queued with no message and send them again (a lost message)."""
        self.purge(queue)
        self.sql("UPDATE task_states SET state = 'canceled', finished_at = UTC_TIMESTAMP(6)"
                 " WHERE state = 'queued'")  # fmt: skip
