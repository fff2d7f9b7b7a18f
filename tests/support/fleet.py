"""A fleet across hosts on one machine: a control host and agent hosts, as an operator runs it.

The control host runs a private MariaDB, a private redis-server, git over HTTP
and the web (the Procfile's ``web``); each agent host runs the Procfile's
``worker`` with the shell executor, its settings naming only the control
host's address (:mod:`.hosts` for the namespaces). Build scripts pushed with
:meth:`Fleet.push` tick into marker files on their agent's own disk, so a
caller counts what really ran, where and when: a run is the span from its
first tick to its last. Used by ``tests/test_fleet.py`` and by the bench.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pymysql
import requests

from .git import GitHttpServer, GitRepo
from .gitlab import gitlab_headers, gitlab_payload, register_project
from .hosts import Host, Network
from .processes import Process, procfile_command, wait_until
from .services import PrivateMariaDB, PrivateRedis

__all__ = ["Run", "Fleet", "start_fleet"]

DB_USER = "opscd"


def _procfile(role: str) -> list[str]:
    return ["sh", "-c", "exec " + procfile_command(role)]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CICD_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return {**env, "PYTHONUNBUFFERED": "1"}


@dataclass
class Run:
    """One run of a build script, as its ticks on an agent's disk show it."""

    agent: str
    ticks: list[float]

    @property
    def first(self) -> float:
        return self.ticks[0]

    @property
    def last(self) -> float:
        return self.ticks[-1]


@dataclass
class Fleet:
    network: Network
    web: str
    git: GitHttpServer
    agents: dict[str, Host]
    log_dir: Path
    nodes: dict[str, Process] = field(default_factory=dict)
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    #: The webhook secret of each project registered by :meth:`new_repo`.
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def control(self) -> Host:
        return self.network.control

    def get(self, path: str, **params) -> requests.Response:
        """A request from the control host, where the web runs."""
        with self.control.entered():
            return requests.get(self.web + path, params=params, timeout=10)

    def task(self, task_id: int) -> dict:
        return self.get(f"/api/tasks/{task_id}").json()

    def log(self, task_id: int, **params) -> str:
        response = self.get(f"/api/tasks/{task_id}/log", **params)
        assert response.status_code == 200, response.text
        return response.text

    def agent_rows(self) -> dict[str, dict]:
        rows = self.get("/api/agents").json()["agents"]
        return {row["hostname"].split("@")[0]: row for row in rows}

    def new_repo(self) -> GitRepo:
        repo = GitRepo.create(self.git.root, f"fleet/app-{uuid.uuid4().hex[:6]}")
        repo.clone_url = self.git.repo_url(repo.project_path)
        with self.control.entered():
            self.secrets[repo.project_path] = register_project(
                self.web, repo.project_path, repo.clone_url
            )
        return repo

    def push(self, repo: GitRepo, ticks: int, branch: str = "main") -> int:
        """Commit a ci.yaml whose script ticks ``ticks`` times, 0.5 s apart; send its webhook."""
        marks = self.network.root / "marks"  # each agent's own disk, as its processes see it
        tick = f'date +%s.%N >> "{marks}/$CI_TASK_ID.$(hostname).$$"'
        ci = (
            "build:\n  script:\n"
            f"    - for i in $(seq 1 {ticks}); do {tick}; sleep 0.5; done\n"
            "    - echo done $CI_TASK_ID\n"
        )
        sha = repo.commit({"ci.yaml": ci}, message=f"push {uuid.uuid4().hex[:6]}", branch=branch)
        payload = gitlab_payload("push-event.json", repo.clone_url, repo.project_path,
                                 f"refs/heads/{branch}", sha)  # fmt: skip
        with self.control.entered():
            response = requests.post(
                self.web + "/webhooks/gitlab", json=payload, timeout=10,
                headers=gitlab_headers(self.secrets[repo.project_path]),
            )  # fmt: skip
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    def runs(self, task_id: int) -> list[Run]:
        """Every run of the build's script on any agent, in the order they started."""
        found = []
        for name, host in self.agents.items():
            for marker in (host.root / "marks").glob(f"{task_id}.*"):
                ticks = [float(line) for line in marker.read_text().split()]
                if ticks:
                    found.append(Run(name, ticks))
        return sorted(found, key=lambda run: run.first)

    def wait_done(self, task_id: int, timeout: float = 120) -> dict:
        def finished() -> dict | None:
            task = self.task(task_id)
            return task if task["state"] in ("success", "failed", "canceled") else None

        return wait_until(finished, timeout, f"build {task_id} to finish", interval=0.3)

    def running_on(self, task_id: int) -> str:
        """The agent running the build's script, once its first tick is written."""
        runs = wait_until(lambda: self.runs(task_id), 60, f"build {task_id}'s script to start")
        return runs[0].agent

    def wait_online(self, agent: str, timeout: float = 60) -> None:
        wait_until(lambda: self.agent_rows().get(agent, {}).get("online"), timeout,
                   f"{agent} to be online")  # fmt: skip

    def start_agent(self, name: str) -> Process:
        """(Re)start the Procfile's worker on agent host ``name``; wait until it is online."""
        node = Process(f"fleet-{name}", self.agents[name].command(_procfile("worker")),
                       self.env[name], self.log_dir)  # fmt: skip
        self.nodes[name] = node
        wait_until(lambda: "ready." in node.output(), 60, f"{name} to be ready")
        self.wait_online(name)
        return node


@contextmanager
def start_fleet(base: Path, offline_after: float = 10, agents: int = 2) -> Iterator[Fleet]:
    """A control host and ``agents`` agent hosts (``agent-a``, ``agent-b`` …); all removed after."""
    network = Network(base / "hosts")
    processes: list[Process] = []
    servers: list = []
    git = None
    fleet = None
    try:
        control = network.control
        hosts = {f"agent-{chr(97 + i)}": network.add_host(f"agent-{chr(97 + i)}")
                 for i in range(agents)}  # fmt: skip
        database = PrivateMariaDB(control.root / "mariadb", host=control).start()
        servers.append(database)
        db_password = "fleet-db-" + uuid.uuid4().hex[:8]
        admin = pymysql.connect(unix_socket=str(database.socket), user="root", autocommit=True)
        with admin.cursor() as cursor:
            cursor.execute("CREATE DATABASE opscd CHARACTER SET utf8mb4")
            cursor.execute(f"CREATE USER '{DB_USER}'@'%' IDENTIFIED BY '{db_password}'")
            cursor.execute(f"GRANT ALL ON opscd.* TO '{DB_USER}'@'%'")
        admin.close()
        broker = PrivateRedis(control.root / "redis", persistent=False, host=control).start()
        servers.append(broker)
        git_user, git_password = "ci-bot", "fleet-git-" + uuid.uuid4().hex[:8]
        with control.entered():  # its listening socket is the control host's
            git = GitHttpServer(control.root / "git", git_user, git_password,
                                host=control.address).start()  # fmt: skip
        settings = {
            "CICD_DATABASE_URL": f"mysql+pymysql://{DB_USER}:{db_password}@{control.address}:"
            f"{database.port}/opscd?charset=utf8mb4",
            "CICD_BROKER_URL": broker.url,
            "CICD_GIT_USERNAME": git_user,
            "CICD_GIT_PASSWORD": git_password,
            "CICD_AGENT_OFFLINE_AFTER": str(offline_after),
            "CICD_REAPER_INTERVAL": "2",
            "CICD_RECONCILE_AFTER": "4",
            "CICD_SECRETS_KEY": "fleet-secrets-" + uuid.uuid4().hex,
        }
        web_env = {**_base_env(), **settings, "PORT": "8000"}
        control.run([sys.executable, "-m", "cicd.cli", "init-db"], env=web_env)
        processes.append(Process("fleet-web", control.command(_procfile("web")), web_env, base))
        fleet = Fleet(network, f"http://{control.address}:8000", git, hosts, base)
        wait_until(lambda: control.port_open(8000), 30, "the web on the control host")
        for name, host in hosts.items():
            (host.root / "marks").mkdir()
            env = {**_base_env(), **settings, "CICD_AGENT_NAME": name, "CICD_EXECUTOR": "shell",
                   "CICD_SHELL_UNSAFE": "1",
                   "CICD_WORKSPACE_DIR": str(network.root / "workspaces")}  # fmt: skip
            loopback = [k for k, v in env.items() if k.startswith("CICD_") and
                        re.search(r"127\.|localhost|::1", v)]  # fmt: skip
            if loopback:
                raise AssertionError(f"an agent's settings name a loopback address: {loopback}")
            fleet.env[name] = env
            node = Process(f"fleet-{name}", host.command(_procfile("worker")), env, base)
            fleet.nodes[name] = node
        for name in hosts:
            wait_until(lambda n=name: "ready." in fleet.nodes[n].output(), 60, f"{name} ready")
            fleet.wait_online(name)
        yield fleet
    finally:
        if fleet is not None:
            processes += list(fleet.nodes.values())
        for process in reversed(processes):
            process.stop()
        if git is not None:
            git.stop()
        for server in reversed(servers):
            server.stop()
        network.close()
