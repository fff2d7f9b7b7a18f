"""Real services for the tests: MariaDB, Redis, git over HTTP, gunicorn and celery workers.

Every process is real and talks over loopback. The test script
(``scripts/test``) makes sure MariaDB and Redis answer; this file creates a
database of its own, a Redis database number of its own, a git server, a web
server and two worker nodes, and removes them all at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import psycopg
import pymysql
import pytest
import redis
import requests
import support.gitlab
from support.containers import (
    HOST_TOOL_MOUNTS,
    PodmanService,
    Registry,
    make_busybox_image,
    make_host_tools_image,
)
from support.git import GitHttpServer, GitRepo
from support.gitlab import gitlab_headers, project_of, register_project
from support.gitlab_api import GitLabAPI
from support.processes import ROOT, Process, free_port, procfile_command, wait_until

from cicd import processes

MYSQL_HOST = os.environ.get("OPSCD_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("OPSCD_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("OPSCD_TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("OPSCD_TEST_MYSQL_PASSWORD", "")
PG_HOST = os.environ.get("OPSCD_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("OPSCD_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("OPSCD_TEST_PG_USER", "postgres")
PG_PASSWORD = os.environ.get("OPSCD_TEST_PG_PASSWORD", "")
#: The databases OpsCD supports in production; the tests that touch the database run on each.
DATABASES = ("mariadb", "postgresql")
#: The brokers OpsCD supports; the fault tests run on each.
BROKERS = ("redis", "rabbitmq")
REDIS_URL = os.environ.get("OPSCD_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
#: The machine's RabbitMQ (scripts/test starts one where none runs); each test session gets
#: a virtual host of its own on it, made and removed with rabbitmqctl.
AMQP_URL = os.environ.get("OPSCD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
#: What an installation on the machine's RabbitMQ (its consumer_timeout: RabbitMQ's default,
#: 30 min) must say so that no stage outlives it: 10 + 5 + 10 minutes at most.
AMQP_SETTINGS = {"CICD_BROKER_CONSUMER_TIMEOUT": "1800", "CICD_MAX_BUILD_TIMEOUT": "600",
                 "CICD_CLONE_TIMEOUT": "300"}  # fmt: skip
#: ``post_gitlab``'s default token: the secret of the project the payload names, which it
#: registers first if it must.
REGISTERED = "registered"
#: The project whose secret ``post_gitlab`` sends with a body that names no project.
ANY_PROJECT = f"opscd-tests/any-{uuid.uuid4().hex[:8]}"
#: This test session's mark on the shared Redis and on its worker names, so two
#: sessions on one machine never take each other's builds.
SESSION = uuid.uuid4().hex[:6]
GIT_USER, GIT_PASSWORD = "ci-bot", "git-pass-" + uuid.uuid4().hex[:12]
FINISHED = {"success", "failed", "canceled"}


# --- databases ------------------------------------------------------------------------------


def mysql_connect(database: str | None = None, **options: Any) -> pymysql.Connection:
    return pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD,
        database=database, **options,
    )  # fmt: skip


def mysql_admin(sql: str, database: str | None = None) -> list[tuple]:
    connection = mysql_connect(database, autocommit=True)
    with connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def pg_admin(sql: str, database: str = "postgres") -> list[tuple]:
    """Run one statement on the test PostgreSQL server as its administrator (autocommit)."""
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD or None,
                         dbname=database, autocommit=True) as connection:  # fmt: skip
        cursor = connection.execute(sql)
        return list(cursor.fetchall()) if cursor.description else []


def admin_sql(url: str, sql: str) -> list[tuple]:
    """Run one statement as the administrator on the test database ``url`` names."""
    database = url.rsplit("/", 1)[1].split("?")[0]
    if url.startswith("postgresql"):
        return pg_admin(sql, database)
    return mysql_admin(sql, database)


@pytest.fixture(scope="session")
def make_database() -> Iterator:
    """Factory of fresh databases on MariaDB or PostgreSQL, all dropped at the end."""
    created: list[tuple[str, str]] = []

    def make(prefix: str = "opscd_test", dialect: str = "mariadb") -> tuple[str, str]:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        created.append((dialect, name))
        if dialect == "postgresql":
            pg_admin(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
            credentials = PG_USER + (f":{PG_PASSWORD}" if PG_PASSWORD else "")
            return name, f"postgresql+psycopg://{credentials}@{PG_HOST}:{PG_PORT}/{name}"
        assert dialect == "mariadb", dialect
        mysql_admin(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        credentials = MYSQL_USER + (f":{MYSQL_PASSWORD}" if MYSQL_PASSWORD else "")
        url = f"mysql+pymysql://{credentials}@{MYSQL_HOST}:{MYSQL_PORT}/{name}?charset=utf8mb4"
        return name, url

    yield make
    for dialect, name in created:
        if dialect == "postgresql":
            pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        else:
            mysql_admin(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture(scope="session")
def database_url(make_database) -> str:
    return make_database()[1]


def rabbitmqctl(*args: str) -> str:
    """The machine's RabbitMQ administered as root does it (``rabbitmqctl``)."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A virtual host of this session's own on the machine's RabbitMQ, removed at the end."""
    from urllib.parse import urlsplit

    name = f"opscd-test-{SESSION}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, urlsplit(AMQP_URL).username or "guest",
                ".*", ".*", ".*")  # fmt: skip
    yield name
    rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="session")
def amqp_url(amqp_vhost: str) -> str:
    return AMQP_URL.rstrip("/") + "/" + amqp_vhost


def private_broker(kind: str, tmp_path: Path) -> tuple[Any, dict[str, str]]:
    """A broker server of the test's own, started (Redis keeps its data, AOF; RabbitMQ its
    durable queues, with its default consumer_timeout), and the settings of an installation
    on it."""
    from support.services import PrivateRabbitMQ, PrivateRedis

    if kind == "rabbitmq":
        node = PrivateRabbitMQ(tmp_path / "rabbitmq").start()
        return node, {"CICD_BROKER_URL": node.url, **AMQP_SETTINGS}
    server = PrivateRedis(tmp_path / "redis", persistent=True).start()
    return server, {"CICD_BROKER_URL": server.url}


@pytest.fixture(params=BROKERS)
def broker(request, tmp_path) -> Iterator[dict[str, str]]:
    """An installation's broker, for tests that fault it: ``{}`` (the session's Redis), or a
    RabbitMQ node of the test's own (``CICD_BROKER_URL`` and the settings it needs)."""
    if request.param == "redis":
        yield {}
        return
    node, settings = private_broker("rabbitmq", tmp_path)
    try:
        yield settings
    finally:
        node.stop()


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


# --- git server -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def git_server(tmp_path_factory) -> Iterator[GitHttpServer]:
    with GitHttpServer(tmp_path_factory.mktemp("git"), GIT_USER, GIT_PASSWORD) as server:
        yield server


@pytest.fixture
def repo(git_server: GitHttpServer) -> GitRepo:
    """A new project on the git server, e.g. ``group/app-1a2b3c``, with nothing pushed yet.

    ``repo.clone_url`` is its HTTP URL on the server.
    """
    created = GitRepo.create(git_server.root, f"group/app-{uuid.uuid4().hex[:8]}")
    created.clone_url = git_server.repo_url(created.project_path)
    return created


# --- OpsCD processes ------------------------------------------------------------------------


def opscd_environment(database_url: str, broker_url: str, tmp_path_factory,
                      broker_prefix: str = f"opscd-test-{SESSION}:",
                      **settings: str) -> dict[str, str]:  # fmt: skip
    """The environment of an installation's OpsCD processes (``settings`` added to the
    tests' defaults); its schema is created here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CICD_")}
    env.update(
        CICD_DATABASE_URL=database_url,
        CICD_BROKER_URL=broker_url,
        CICD_GIT_USERNAME=GIT_USER,
        CICD_GIT_PASSWORD=GIT_PASSWORD,
        CICD_WORKSPACE_DIR=str(tmp_path_factory.mktemp("workspaces")),
        CICD_CACHE_DIR=str(tmp_path_factory.mktemp("cache")),
        CICD_EXECUTOR="shell",
        # The tests run as root; builds as root read the worker's settings. The stacks here
        # hold no secret worth that; tests/test_security.py runs builds as CICD_SHELL_USER.
        CICD_SHELL_UNSAFE="1",
        CICD_BROKER_PREFIX=broker_prefix,
        CICD_AGENT_OFFLINE_AFTER="6",
        CICD_SECRETS_KEY="test-secrets-key-" + uuid.uuid4().hex,
        # This stack has no container engine: publishing must fail clearly.
        CICD_DOCKER_HOST="unix:///nonexistent/docker.sock",
        CICD_REGISTRY="127.0.0.1:9/opscd",
        PYTHONUNBUFFERED="1",
    )
    env.update(settings)
    subprocess.run([sys.executable, "-m", "cicd.cli", "init-db"], env=env, check=True, cwd=ROOT)
    return env


@pytest.fixture(scope="session")
def opscd_env(database_url: str, broker_url: str, tmp_path_factory) -> dict[str, str]:
    """The environment of every OpsCD process the tests start; the schema is created once."""
    return opscd_environment(database_url, broker_url, tmp_path_factory)


#: The login of each web process started with one, for the tests' API calls.
WEB_LOGINS: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="session")
def start_web(opscd_env: dict[str, str], tmp_path_factory) -> Iterator:
    """Factory: a gunicorn serving ``cicd.web:create_app()``; returns its base URL."""
    started: list[Process] = []
    log_dir = tmp_path_factory.mktemp("web-logs")

    def start(**overrides: str) -> str:
        """A web process; its login (if ``CICD_UI_PASSWORD`` is set) is kept in WEB_LOGINS."""
        process, base = serve_web({**opscd_env, **overrides}, log_dir)
        started.append(process)
        return base

    start.started = started  # type: ignore[attr-defined]  # (_stop_what_the_test_started)
    yield start
    for process in started:
        process.stop()


@pytest.fixture(autouse=True)
def _stop_what_the_test_started(request) -> Iterator[None]:
    """The web processes and stacks a test starts end with the test (each holds connections
    of the shared MariaDB, whose 151 would run out over a session); those of fixtures of a
    wider scope, set up before this one, stay until those fixtures end."""
    factories = {name: request.getfixturevalue(name) for name in ("start_stack", "start_web")
                 if name in request.fixturenames}  # fmt: skip
    before = {name: len(_started_by(factory)) for name, factory in factories.items()}
    yield
    for name, factory in factories.items():  # stacks' workers first, then the webs
        started = _started_by(factory)
        for item in reversed(started[before[name] :]):
            (item.worker if isinstance(item, Stack) else item).stop()
        del started[before[name] :]


def _started_by(factory: Any) -> list:
    return factory.stacks if hasattr(factory, "stacks") else factory.started


def serve_web(env: dict[str, str], log_dir: Path) -> tuple[Process, str]:
    """A gunicorn serving ``cicd.web:create_app()`` with ``env``, answering; and its base URL."""
    port = free_port()
    args = processes.with_python(processes.web(f"127.0.0.1:{port}"))
    process = Process(f"web-{port}", args, env, log_dir)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"web exited:\n{process.output()}")
        try:
            return requests.get(base + "/healthz", timeout=2).ok
        except requests.RequestException:  # not listening, or still importing the app
            return False

    try:
        wait_until(up, 30, "gunicorn to answer")
    except BaseException:
        process.stop()
        raise
    if env.get("CICD_UI_PASSWORD"):
        WEB_LOGINS[base] = ("admin", env["CICD_UI_PASSWORD"])
    return process, base


@pytest.fixture(scope="session")
def web(start_web) -> str:
    return start_web()


def procfile_worker(name: str, env: dict[str, str], log_dir: Path, **settings: str) -> Process:
    """A worker node started as the Procfile starts it, named ``<name>@<host>``."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    worker_env = {**env, "PATH": path, "CICD_AGENT_NAME": name, **settings}
    args = ["sh", "-c", "exec " + procfile_command("worker")]
    assert shlex.split(procfile_command("worker"))[0] == "celery"
    return Process(name, args, worker_env, log_dir)


def worker_args(name: str, *extra: str) -> list[str]:
    return [*processes.with_python(processes.worker(f"{name}@t{SESSION}")), *extra]


def wait_ready(node: Process, timeout: float = 60) -> None:
    wait_until(
        lambda: "ready." in node.output() or node.popen.poll() is not None,
        timeout,
        f"{node.name} to be ready",
    )
    assert node.popen.poll() is None, node.output()


def start_nodes(env: dict[str, str], log_dir: Path, names=("node1", "node2")) -> list[Process]:
    """Real worker nodes ``<name>@t<session>``, concurrency 3 each, ready."""
    nodes = [Process(name, worker_args(name), env, log_dir) for name in names]
    try:
        for node in nodes:
            wait_ready(node)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def installation_fixtures(label: str) -> tuple[Callable, Callable]:
    """``web`` and ``workers`` fixtures of a module's installation of its own: a gunicorn and
    two worker nodes started with the module's ``opscd_env``. A module that assigns them
    (``web, workers = installation_fixtures("pg")``) runs the tests it holds, the ones it
    imports from other modules included, against that installation."""

    @pytest.fixture(scope="module")
    def web(opscd_env, tmp_path_factory) -> Iterator[str]:
        process, base = serve_web(opscd_env, tmp_path_factory.mktemp(f"{label}-web"))
        yield base
        process.stop()

    @pytest.fixture(scope="module")
    def workers(opscd_env, web, tmp_path_factory) -> Iterator[list[Process]]:
        nodes = start_nodes(opscd_env, tmp_path_factory.mktemp(f"{label}-workers"))
        yield nodes
        for node in nodes:
            node.stop()

    return web, workers


@pytest.fixture(scope="session")
def workers(opscd_env: dict[str, str], tmp_path_factory) -> Iterator[list[Process]]:
    """Two real worker nodes, ``node1@<host>`` and ``node2@<host>``, concurrency 3 each."""
    nodes = start_nodes(opscd_env, tmp_path_factory.mktemp("worker-logs"))
    yield nodes
    for node in nodes:
        node.stop()


# --- containers: podman's Docker API, a registry, base images ------------------------------

REGISTRY_USER = "ci-pusher"
REGISTRY_PASSWORD = "registry-pass-" + uuid.uuid4().hex[:12]
CONTAINER_TOOLS = {
    "podman": "podman",
    "runc": "runc",
    "docker-registry": "docker-registry",
    "htpasswd": "apache2-utils",
    "busybox": "busybox-static",
    "mvn": "maven",
}


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Iterator[Registry]:
    missing = [pkg for tool, pkg in CONTAINER_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"container tools missing: apt-get install -y {' '.join(missing)}")
    with Registry(tmp_path_factory.mktemp("registry"), REGISTRY_USER, REGISTRY_PASSWORD) as server:
        yield server


@pytest.fixture(scope="session")
def podman(registry: Registry, tmp_path_factory) -> Iterator[PodmanService]:
    with PodmanService(tmp_path_factory.mktemp("podman"), [registry.address]) as service:
        yield service
    assert service.mounts() == [], "podman left mounts behind"


@pytest.fixture(scope="session")
def docker_client(podman: PodmanService) -> Iterator[docker.DockerClient]:
    client = podman.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(podman: PodmanService) -> str:
    return make_busybox_image(podman)


@pytest.fixture(scope="session")
def hosttools_image(podman: PodmanService) -> str:
    return make_host_tools_image(podman)


class Stack:
    """A web process and one worker node on a broker database of their own."""

    def __init__(self, web: str, worker: Process, env: dict[str, str]) -> None:
        self.web, self.worker, self.env = web, worker, env


@pytest.fixture(scope="session")
def isolated_env(opscd_env, make_database) -> Callable[..., dict[str, str]]:
    """Factory: settings of a separate installation, with a database and broker keys of its own.

    Its workers never see the session's builds: a reconciler or reaper there
    would otherwise send them to its own broker.
    """

    def make(name: str, **overrides: str) -> dict[str, str]:
        from sqlalchemy import create_engine

        from cicd.models import Base

        env = {**opscd_env, "CICD_BROKER_PREFIX": f"opscd-test-{SESSION}-{name}:"}
        if "CICD_DATABASE_URL" not in overrides:
            _, url = make_database(f"opscd_{name.replace('-', '_')}")
            engine = create_engine(url)
            Base.metadata.create_all(engine)
            engine.dispose()
            env["CICD_DATABASE_URL"] = url
        return {**env, **overrides}

    return make


@pytest.fixture(scope="session")
def start_stack(isolated_env, start_web, tmp_path_factory) -> Iterator:
    """Factory of isolated stacks (own database and broker keys), e.g. a docker-executor agent."""
    stacks: list[Stack] = []

    def start(name: str, **overrides: str) -> Stack:
        env = isolated_env(name, **overrides)
        web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
        worker = Process(name, worker_args(name), env, tmp_path_factory.mktemp(f"{name}-logs"))
        wait_ready(worker)
        stack = Stack(web, worker, env)
        stacks.append(stack)
        return stack

    start.stacks = stacks  # type: ignore[attr-defined]  # (_stop_what_the_test_started)
    yield start
    for stack in stacks:
        stack.worker.stop()


@pytest.fixture(scope="session")
def docker_env(podman, registry, hosttools_image, busybox_image, tmp_path_factory) -> dict:
    """Settings of an agent with the docker executor on podman, pushing to the test registry."""
    from support.containers import write_maven_settings

    maven = tmp_path_factory.mktemp("maven")
    (maven / "repository").mkdir()
    settings = write_maven_settings(maven / "settings.xml", "/cache/m2-repository")
    return {
        "CICD_EXECUTOR": "docker",
        "CICD_DOCKER_HOST": podman.docker_host,
        "CICD_DOCKER_NETWORK": "none",  # never podman's bridge here
        "CICD_DOCKER_PULL": "never",  # nothing can be pulled on these machines
        "CICD_DOCKER_MEMORY": "1g",
        "CICD_DOCKER_CPUS": "1.5",
        "CICD_DOCKER_VOLUMES": ",".join(
            [*HOST_TOOL_MOUNTS, f"{maven / 'repository'}:/cache/m2-repository:rw"]
        ),
        "CICD_MAVEN_SETTINGS": str(settings),
        "CICD_REGISTRY": f"{registry.address}/opscd",
        "CICD_REGISTRY_USERNAME": REGISTRY_USER,
        "CICD_REGISTRY_PASSWORD": REGISTRY_PASSWORD,
        "CICD_IMAGE_JAVA": hosttools_image,
        "CICD_IMAGE_PYTHON": hosttools_image,
        "CICD_IMAGE_GO": hosttools_image,  # Debian's golang-go, lent from the host's /usr/lib
        "OPSCD_TEST_MAVEN_REPOSITORY": str(maven / "repository"),
    }


# --- commit statuses: the stand-in GitLab API and the Procfile's reporter ------------------


@pytest.fixture(scope="module")
def gitlab_api():
    """A stand-in GitLab API (commit statuses), one per test module."""
    with GitLabAPI() as api:
        yield api


def start_reporter(env: dict[str, str], web: str, log_dir: Path) -> Process:
    """The Procfile's reporter, with the web's address as CICD_PUBLIC_URL."""
    command = procfile_command("reporter")
    assert shlex.split(command)[:3] == ["celery", "-A", "cicd.reporter"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    node = Process("reporter", ["sh", "-c", "exec " + command],
                   {**env, "PATH": path, "CICD_PUBLIC_URL": web}, log_dir)  # fmt: skip
    wait_until(lambda: "ready." in node.output() or node.popen.poll() is not None, 60,
               "the reporter to be ready")  # fmt: skip
    assert node.popen.poll() is None, node.output()
    return node


@pytest.fixture(scope="module")
def reporter(web, workers, opscd_env, tmp_path_factory):
    node = start_reporter(opscd_env, web, tmp_path_factory.mktemp("reporter"))
    yield node
    node.stop()


# --- webhooks -------------------------------------------------------------------------------


def gitlab_payload(
    name: str, repo: GitRepo, ref: str, after: str, before: str | None = None
) -> dict:
    """A recorded GitLab payload with its URLs and commit ids pointed at ``repo``."""
    return support.gitlab.gitlab_payload(
        name, repo.clone_url, repo.project_path, ref, after, before
    )


def post_gitlab(
    base: str,
    payload: dict | bytes,
    event: str = "Push Hook",
    token: str | None = REGISTERED,
    delivery: str | None = None,
    **headers: str,
) -> requests.Response:
    """Deliver a webhook. With the default ``token`` the project the payload names is
    registered first (with the payload's clone URL), as a user does before adding the
    webhook; a body that names no project carries a registered project's secret."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    registered = token == REGISTERED
    if registered:
        named = project_of(payload) if isinstance(payload, dict) else None
        project, clone_url = named or (ANY_PROJECT, "http://127.0.0.1:9/opscd-tests/any.git")
        token = register_project(base, project, clone_url, WEB_LOGINS.get(base))
    all_headers = {**gitlab_headers(token, event, delivery), **headers}
    answer = requests.post(base + "/webhooks/gitlab", data=body, headers=all_headers, timeout=10)
    stale = answer.status_code in (401, 404) or "registered with clone URL" in answer.text
    if registered and stale:
        # Another web on this database rotated the secret, or the clone URL changed.
        token = register_project(base, project, clone_url, WEB_LOGINS.get(base), fresh=True)
        all_headers["X-Gitlab-Token"] = token
        answer = requests.post(base + "/webhooks/gitlab", data=body, headers=all_headers,
                               timeout=10)  # fmt: skip
    return answer


#: What OpsCD's pages and its CLI send with every change: a cross-site form cannot.
CHANGE = {"X-Requested-With": "tests"}


def change(method: str, url: str, **kwargs: Any) -> requests.Response:
    """A state-changing API request (POST, PUT, PATCH, DELETE) as the pages send it."""
    return requests.request(method, url, headers={**CHANGE, **kwargs.pop("headers", {})},
                            **kwargs)  # fmt: skip


def wait_for_task(base: str, task_id: int, timeout: float = 60) -> dict:
    """Poll the API until the task is finished; return it."""

    def finished() -> dict | None:
        task = requests.get(f"{base}/api/tasks/{task_id}", timeout=5).json()
        return task if task["state"] in FINISHED else None

    return wait_until(finished, timeout, f"task {task_id} to finish", interval=0.2)


def task_log(base: str, task_id: int) -> str:
    response = requests.get(f"{base}/api/tasks/{task_id}/log", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text
