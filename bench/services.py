"""What the benchmarks run against: MariaDB, Redis, gunicorn, celery worker nodes, a git server.

Everything is real and on loopback. MariaDB and Redis are used where they
answer on 127.0.0.1 and started the way ``scripts/test`` starts them where
they do not (and stopped again at the end). The bench gets a database of its
own (``opscd_bench_<random>``, dropped at the end) and a Redis database number
of its own (flushed before and after).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psutil
import pymysql
import redis
import requests

from cicd import processes
from tests.support.git import GitHttpServer, GitRepo
from tests.support.processes import ROOT, Process, free_port, port_open, wait_until

__all__ = [
    "ROOT",
    "MySQL",
    "BenchRepo",
    "Process",
    "ensure_services",
    "free_port",
    "wait_until",
    "start_web",
    "start_worker",
    "make_repo",
    "CountingGitServer",
    "MavenRepoServer",
    "tree_rss",
    "tree_pss",
    "tree_cpu_seconds",
    "find_process",
    "ForeignCpu",
]

# --- MariaDB and Redis -------------------------------------------------------------------------


@dataclass(frozen=True)
class MySQL:
    """How to reach MariaDB: ``OPSCD_BENCH_MYSQL_*``, else the tests' ``OPSCD_TEST_MYSQL_*``."""

    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_environment(cls) -> MySQL:
        def get(name: str, default: str) -> str:
            return os.environ.get(
                f"OPSCD_BENCH_MYSQL_{name}", os.environ.get(f"OPSCD_TEST_MYSQL_{name}", default)
            )

        return cls(
            get("HOST", "127.0.0.1"),
            int(get("PORT", "3306")),
            get("USER", "root"),
            get("PASSWORD", ""),
        )

    def connect(self, database: str | None = None) -> pymysql.Connection:
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            autocommit=True,
        )

    def query(self, sql: str, database: str | None = None) -> list[tuple]:
        connection = self.connect(database)
        with connection, connection.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall())

    def url(self, database: str) -> str:
        credentials = self.user + (f":{self.password}" if self.password else "")
        return f"mysql+pymysql://{credentials}@{self.host}:{self.port}/{database}?charset=utf8mb4"

    def create_database(self) -> str:
        name = f"opscd_bench_{uuid.uuid4().hex[:10]}"
        self.query(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        return name

    def drop_database(self, name: str) -> None:
        self.query(f"DROP DATABASE IF EXISTS {name}")


@dataclass(frozen=True)
class PostgreSQL:
    """How to reach PostgreSQL: ``OPSCD_BENCH_PG_*``, else the tests' ``OPSCD_TEST_PG_*``."""

    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_environment(cls) -> PostgreSQL:
        def get(name: str, default: str) -> str:
            return os.environ.get(
                f"OPSCD_BENCH_PG_{name}", os.environ.get(f"OPSCD_TEST_PG_{name}", default)
            )

        return cls(get("HOST", "127.0.0.1"), int(get("PORT", "5432")), get("USER", "postgres"),
                   get("PASSWORD", ""))  # fmt: skip

    def connect(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user,
                               password=self.password or None, dbname=database,
                               autocommit=True)  # fmt: skip

    def query(self, sql: str, database: str = "postgres", params: tuple = ()) -> list[tuple]:
        with self.connect(database) as connection:
            cursor = connection.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    def url(self, database: str) -> str:
        credentials = self.user + (f":{self.password}" if self.password else "")
        return f"postgresql+psycopg://{credentials}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"opscd_bench_{uuid.uuid4().hex[:10]}"
        self.query(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        self.query(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def server_pid(self) -> int | None:
        """The postmaster's pid (its process tree is every backend's CPU)."""
        path = self.query("SHOW data_directory")[0][0]
        try:
            return int((Path(path) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ensure_services(mysql: MySQL, redis_url: str, state: Path) -> list[Callable[[], None]]:
    """Make sure MariaDB and Redis answer; start them as ``scripts/test`` does if they do not.

    Returns how to stop what was started here (nothing, when both were running).
    """
    stops: list[Callable[[], None]] = []
    redis_port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    if not port_open(mysql.port, mysql.host):
        if mysql.host not in ("127.0.0.1", "localhost") or not Path("/usr/sbin/mariadbd").exists():
            raise SystemExit(
                f"MariaDB does not answer on {mysql.host}:{mysql.port}: start it, or install it "
                "(apt-get install -y mariadb-server) and run ./scripts/test once"
            )
        _log("starting MariaDB")
        pidfile = state / "mariadb.pid"
        Path("/run/mysqld").mkdir(exist_ok=True)
        with suppress(OSError):
            shutil.chown("/run/mysqld", "mysql", "mysql")
        subprocess.run(
            [
                "start-stop-daemon",
                "--start",
                "--oknodo",
                "--background",
                "--make-pidfile",
                "--pidfile",
                str(pidfile),
                "--exec",
                "/usr/sbin/mariadbd",
                "--",
                "--user=mysql",
            ],
            check=True,
        )
        wait_until(lambda: port_open(mysql.port), 30, "MariaDB to listen", interval=0.2)

        def stop_mariadb() -> None:
            _log("stopping the MariaDB it started")
            with suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            with suppress(TimeoutError):
                wait_until(lambda: not port_open(mysql.port), 20, "MariaDB to stop", 0.2)

        stops.append(stop_mariadb)
    if not port_open(redis_port):
        if shutil.which("redis-server") is None:
            raise SystemExit(
                f"Redis does not answer on 127.0.0.1:{redis_port}: start it, or install it "
                "(apt-get install -y redis-server)"
            )
        _log("starting Redis")
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(state),
                "--logfile",
                str(state / "redis.log"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(redis_port), 30, "Redis to listen", interval=0.2)

        def stop_redis() -> None:
            _log("stopping the Redis it started")
            with suppress(redis.RedisError):
                redis.Redis(port=redis_port).shutdown(nosave=True)

        stops.append(stop_redis)
    return stops


# --- processes ---------------------------------------------------------------------------------


def start_web(name: str, app: str, env: dict[str, str], log_dir: Path) -> tuple[Process, str]:
    """gunicorn with the Procfile's web options (2 gthread workers, 8 threads each)."""
    port = free_port()
    args = processes.with_python(processes.web(f"127.0.0.1:{port}", app=app))
    process = Process(name, args, env, log_dir)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        process.check_alive()
        try:
            return requests.get(base + "/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_until(up, 60, f"{name} to answer", interval=0.1)
    except BaseException:
        process.stop()
        raise
    return process, base


def start_worker(
    name: str, app: str, env: dict[str, str], log_dir: Path, concurrency: int = 3
) -> Process:
    """``celery -A APP worker -n NAME@%h -c 3``, as the Procfile runs it (log level INFO)."""
    args = processes.with_python(processes.worker(name, concurrency, app=app))
    return Process(name, args, env, log_dir)


def wait_ready(nodes: Iterable[Process], timeout: float = 60) -> None:
    for node in nodes:

        def ready(node: Process = node) -> bool:
            node.check_alive()
            return " ready." in node.output()

        wait_until(ready, timeout, f"{node.name} to be ready", interval=0.1)


# --- the git repository the builds clone ---------------------------------------------------


@dataclass(frozen=True)
class BenchRepo:
    """A bare repository on disk; ``main`` builds ``script: true``, ``stamp`` prints the time."""

    path: str  # project path, e.g. "bench/app"
    shas: dict[str, str]  # branch → commit


CI_YAML = {
    "main": 'build:\n  script: "true"\n',
    "stamp": 'build:\n  script: "date +%s.%N"\n',
    "sleep": "build:\n  script: sleep 120\n",  # a build in flight, to kill its node under
}


def make_repo(root: Path, project: str = "bench/app") -> BenchRepo:
    """Create ``root/<project>.git`` (the tests' :class:`GitRepo`): one commit per branch."""
    repo = GitRepo.create(root, project)
    shas = {
        branch: repo.commit(
            {"ci.yaml": ci_yaml, "README.md": f"OpsCD benchmark project, branch {branch}\n"},
            message=f"bench: {branch}",
            branch=branch,
        )
        for branch, ci_yaml in CI_YAML.items()
    }
    return BenchRepo(project, shas)


class CountingGitServer(GitHttpServer):
    """The tests' git server (OpsCD's own, :mod:`cicd.gitserve`) counting the bytes it sends.

    A warm checkout is meant to fetch less from the forge: the bytes of every answer
    body (what ``git http-backend`` streams) are the figure, read by :meth:`sent` before
    and after a build. Only the WSGI answer is wrapped; what the server does is unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sent = 0
        self._count_lock = threading.Lock()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        answer = super()._app(environ, start_response)
        try:
            for block in answer:
                with self._count_lock:
                    self._sent += len(block)
                yield block
        finally:  # the backend's answer ends (and its process is waited for) now, not at GC
            close = getattr(answer, "close", None)
            if close is not None:
                close()

    def sent(self) -> int:
        """Bytes of answer bodies sent since the server started."""
        with self._count_lock:
            return self._sent


class MavenRepoServer:
    """A static HTTP server over Debian's Maven repository on 127.0.0.1, counting what it serves.

    A Maven repository over HTTP is what a build downloads its dependencies from; a
    warm dependency cache should make it ask for nothing. ``counts()`` says how many
    requests (all, and GETs of ``.jar`` and ``.pom``) it answered since the last ``reset()``.
    """

    def __init__(self, root: Path = Path("/usr/share/maven-repo")) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "jar": 0, "pom": 0, "not_found": 0}
        self._jars: list[str] = []
        counts, lock, jars = self._counts, self._lock, self._jars

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # every artifact would be a line

            def send_response(self, code: int, message: str | None = None) -> None:
                with lock:
                    counts["requests"] += 1
                    counts["not_found"] += code == 404
                    if code == 200 and self.command == "GET":
                        suffix = self.path.rsplit(".", 1)[-1]
                        if suffix in ("jar", "pom"):
                            counts[suffix] += 1
                        if suffix == "jar":
                            jars.append(self.path)
                super().send_response(code, message)

        handler = functools.partial(Handler, directory=str(root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        with self._lock:
            for key in self._counts:
                self._counts[key] = 0
            self._jars.clear()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def jars(self) -> list[str]:
        """Paths of the jars served since the last ``reset()``."""
        with self._lock:
            return list(self._jars)


# --- process trees: memory and CPU ---------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = 0
    for process in _tree(pid):
        with suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


def tree_pss(pid: int) -> int:
    """Proportional set size of a process tree: pages shared after a fork count once in total."""
    total = 0
    for process in _tree(pid):
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_full_info().pss
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process, its living descendants and their ended children.

    Ended children (git, ``sh``) count once their parent has waited for them.
    """
    total = 0.0
    for process in _tree(pid):
        with suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def find_process(*names: str) -> int | None:
    """The pid of a running process named one of ``names`` (e.g. ``mariadbd``), if any."""
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in names:
            return process.pid
    return None


class ForeignCpu:
    """CPU used meanwhile by processes that are not the bench's (nor MariaDB's and Redis's).

    Other work on the machine skews every figure; this says how much there was,
    as a percentage of all cores over the time measured.
    """

    def __init__(self, service_pids: Iterable[int]) -> None:
        self.services = set(service_pids)
        self.start = time.monotonic()
        self.before = self._foreign()

    def _foreign(self) -> dict[int, float]:
        own = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
        own |= self.services
        times: dict[int, float] = {}
        for process in psutil.process_iter():
            if process.pid in own:
                continue
            with suppress(psutil.Error):
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
        return times

    def percent(self) -> float:
        after = self._foreign()
        used = sum(max(0.0, total - self.before.get(pid, 0.0)) for pid, total in after.items())
        elapsed = time.monotonic() - self.start
        return round(100 * used / elapsed / (os.cpu_count() or 1), 1)
