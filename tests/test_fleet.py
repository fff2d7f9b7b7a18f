"""A fleet across hosts: a control host and two agent hosts, and the faults a fleet meets.

Hosts are network namespaces on a private /24 (:mod:`support.hosts`); each agent
runs in a mount namespace where the fleet's directory is its own disk, so it
reads nothing of the control host's files. The control host runs a private
MariaDB, a private redis-server, git over HTTP and the web (Procfile); each
agent runs the Procfile's worker with the shell executor and
``CICD_AGENT_OFFLINE_AFTER=10``. Build scripts tick into marker files on
their agent's own disk, so the test counts what really ran, where and when:
a run is the span from its first tick to its last.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pymysql
import pytest
import requests
from conftest import GIT_PASSWORD, GIT_USER, WEBHOOK_SECRET, gitlab_payload, procfile_command
from support.git import GitHttpServer, GitRepo
from support.gitlab import gitlab_headers
from support.hosts import Host, Network
from support.processes import Process, wait_until
from support.services import PrivateMariaDB, PrivateRedis

OFFLINE_AFTER = 10
DB_USER, DB_PASSWORD = "opscd", "fleet-db-" + uuid.uuid4().hex[:8]


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
    nodes: dict[str, Process] = field(default_factory=dict)
    env: dict[str, dict[str, str]] = field(default_factory=dict)

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
        payload = gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha)
        with self.control.entered():
            response = requests.post(
                self.web + "/webhooks/gitlab", json=payload, timeout=10,
                headers=gitlab_headers(WEBHOOK_SECRET),
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


def procfile(role: str) -> list[str]:
    return ["sh", "-c", "exec " + procfile_command(role)]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CICD_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return {**env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.fail("the fleet test makes network namespaces: it runs as root (as .ci/run does)")
    base = tmp_path_factory.mktemp("fleet")
    network = Network(base / "hosts")
    processes: list[Process] = []
    servers: list = []
    git = None
    try:
        control = network.control
        agents = {name: network.add_host(name) for name in ("agent-a", "agent-b")}
        database = PrivateMariaDB(control.root / "mariadb", host=control).start()
        servers.append(database)
        admin = pymysql.connect(unix_socket=str(database.socket), user="root", autocommit=True)
        with admin.cursor() as cursor:
            cursor.execute("CREATE DATABASE opscd CHARACTER SET utf8mb4")
            cursor.execute(f"CREATE USER '{DB_USER}'@'%' IDENTIFIED BY '{DB_PASSWORD}'")
            cursor.execute(f"GRANT ALL ON opscd.* TO '{DB_USER}'@'%'")
        admin.close()
        broker = PrivateRedis(control.root / "redis", persistent=False, host=control).start()
        servers.append(broker)
        with control.entered():  # its listening socket is the control host's
            git = GitHttpServer(control.root / "git", GIT_USER, GIT_PASSWORD,
                                host=control.address).start()  # fmt: skip
        settings = {
            "CICD_DATABASE_URL": f"mysql+pymysql://{DB_USER}:{DB_PASSWORD}@{control.address}:"
            f"{database.port}/opscd?charset=utf8mb4",
            "CICD_BROKER_URL": broker.url,
            "CICD_GIT_USERNAME": GIT_USER,
            "CICD_GIT_PASSWORD": GIT_PASSWORD,
            "CICD_AGENT_OFFLINE_AFTER": str(OFFLINE_AFTER),
            "CICD_REAPER_INTERVAL": "2",
            "CICD_RECONCILE_AFTER": "4",
            "CICD_SECRETS_KEY": "fleet-secrets-" + uuid.uuid4().hex,
        }
        web_env = {**base_env(), **settings, "CICD_WEBHOOK_SECRET": WEBHOOK_SECRET,
                   "PORT": "8000"}  # fmt: skip
        control.run([sys.executable, "-m", "cicd.cli", "init-db"], env=web_env)
        processes.append(Process("fleet-web", control.command(procfile("web")), web_env, base))
        fleet = Fleet(network, f"http://{control.address}:8000", git, agents)
        wait_until(lambda: control.port_open(8000), 30, "the web on the control host")
        for name, host in agents.items():
            (host.root / "marks").mkdir()
            env = {**base_env(), **settings, "CICD_AGENT_NAME": name, "CICD_EXECUTOR": "shell",
                   "CICD_WORKSPACE_DIR": str(network.root / "workspaces")}  # fmt: skip
            loopback = [k for k, v in env.items() if k.startswith("CICD_") and
                        re.search(r"127\.|localhost|::1", v)]  # fmt: skip
            assert not loopback, f"an agent's settings name a loopback address: {loopback}"
            node = Process(f"fleet-{name}", host.command(procfile("worker")), env, base)
            processes.append(node)
            fleet.nodes[name], fleet.env[name] = node, env
        for name in agents:
            wait_until(lambda n=name: "ready." in fleet.nodes[n].output(), 60, f"{name} ready")
            fleet.wait_online(name)
        yield fleet
    finally:
        for process in reversed(processes):
            process.stop()
        if git is not None:
            git.stop()
        for server in reversed(servers):
            server.stop()
        network.close()


@pytest.fixture
def repo(fleet: Fleet) -> GitRepo:
    created = GitRepo.create(fleet.git.root, f"fleet/app-{uuid.uuid4().hex[:6]}")
    created.clone_url = fleet.git.repo_url(created.project_path)
    return created


def max_in_flight(runs: list[Run]) -> int:
    """The most runs executing at one moment."""
    edges = sorted([(run.first, 1) for run in runs] + [(run.last, -1) for run in runs])
    most = current = 0
    for _, change in edges:
        current += change
        most = max(most, current)
    return most


def other(fleet: Fleet, agent: str) -> str:
    return next(name for name in fleet.agents if name != agent)


def test_builds_spread_over_both_agents_within_their_slots_and_every_log_reads_on_control(
    fleet: Fleet, repo: GitRepo
):
    ids = [fleet.push(repo, ticks=8, branch=f"spread-{i}") for i in range(8)]
    for task_id in ids:
        done = fleet.wait_done(task_id)
        assert done["state"] == "success", fleet.log(task_id)
        assert f"\ndone {task_id}\n" in fleet.log(task_id)  # stored by an agent, read here
    runs = {task_id: fleet.runs(task_id) for task_id in ids}
    assert all(len(found) == 1 for found in runs.values()), runs
    by_agent = {name: [r for found in runs.values() for r in found if r.agent == name]
                for name in fleet.agents}  # fmt: skip
    assert all(by_agent.values()), f"one agent ran nothing: {by_agent}"
    for name, agent_runs in by_agent.items():
        assert max_in_flight(agent_runs) <= 3, f"{name} ran more than its 3 slots at once"


def test_a_partitioned_agents_build_runs_once_at_a_time_and_ends_as_the_reruns(
    fleet: Fleet, repo: GitRepo
):
    task_id = fleet.push(repo, ticks=40)  # 20 s: longer than the agent's lease (8 s)
    cut = fleet.running_on(task_id)
    host = fleet.agents[cut]
    time.sleep(1)
    host.cut(fleet.control)
    try:
        time.sleep(OFFLINE_AFTER + 6)  # the agent is taken for offline, its build run again
    finally:
        host.heal()
    done = fleet.wait_done(task_id)
    current = fleet.log(task_id)
    assert done["state"] == "success" and done["attempt"] == 2, current
    assert done["worker"].startswith(other(fleet, cut) + "@")
    runs = fleet.runs(task_id)
    assert [run.agent for run in runs] == [cut, other(fleet, cut)], runs
    first, rerun = runs
    assert first.last < rerun.first, "two runs of the build executed at the same time"
    assert len(first.ticks) < 40, "the partitioned run was not stopped"
    assert current.count("Build succeeded") == 1 and current.count(f"\ndone {task_id}\n") == 1
    assert "stopped responding" in current
    wait_until(lambda: "run 1 was superseded by run 2" in fleet.log(task_id, attempt=1), 90,
               "the partitioned run to say it was replaced")  # fmt: skip
    fleet.wait_online(cut, timeout=90)
    later = [fleet.push(repo, ticks=4, branch=f"after-cut-{i}") for i in range(6)]
    for later_id in later:
        assert fleet.wait_done(later_id)["state"] == "success", fleet.log(later_id)
    assert any(run.agent == cut for i in later for run in fleet.runs(i)), "healed agent idle"


def test_an_agent_cut_from_the_broker_only_keeps_its_build_and_takes_work_when_it_is_back(
    fleet: Fleet, repo: GitRepo
):
    task_id = fleet.push(repo, ticks=16)
    cut = fleet.running_on(task_id)
    host, node = fleet.agents[cut], fleet.nodes[cut]
    broker_port = int(fleet.env[cut]["CICD_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])
    host.cut(fleet.control, port=broker_port)
    cut_at = time.monotonic()
    try:
        # Builds pushed meanwhile fill the other agent's 3 slots: this one takes none. (The
        # first may be popped by this agent's dead connection: the reaper sends it again.)
        busy = [fleet.push(repo, ticks=60, branch=f"busy-{i}") for i in range(3)]
        wait_until(lambda: all(fleet.task(i)["worker"] for i in busy), 40, "the busy builds")
        assert {fleet.task(i)["worker"].split("@")[0] for i in busy} == {other(fleet, cut)}
        time.sleep(max(0.0, cut_at + OFFLINE_AFTER + 2 - time.monotonic()))
        row = fleet.agent_rows()[cut]
        assert row["online"], row  # its heartbeats reach the database
        assert row["broker_unreachable_since"], row
        assert "broker unreachable since" in fleet.get("/agents").text
        waiting = fleet.push(repo, ticks=2, branch="after-broker-cut")  # only this agent has room
    finally:
        host.heal()
        healed = time.monotonic()
    wait_until(lambda: fleet.task(waiting)["worker"], 30, "the waiting build to be taken")
    taken = time.monotonic() - healed
    assert fleet.task(waiting)["worker"].startswith(cut + "@")
    assert taken <= 5, f"the agent took a build {taken:.1f}s after the broker came back"
    done = fleet.wait_done(task_id)
    current = fleet.log(task_id)
    assert done["state"] == "success" and done["attempt"] == 1, current
    assert len(fleet.runs(task_id)) == 1 and "running it again" not in current
    assert "broker unreachable since" in node.output()
    wait_until(lambda: not fleet.agent_rows()[cut]["broker_unreachable_since"], 30,
               "the agents page to drop the broker note")  # fmt: skip
    for other_id in [*busy, waiting]:
        assert fleet.wait_done(other_id)["state"] == "success", fleet.log(other_id)


def test_a_killed_agent_hosts_build_runs_again_on_the_other_agent(fleet: Fleet, repo: GitRepo):
    task_id = fleet.push(repo, ticks=30)
    killed = fleet.running_on(task_id)
    time.sleep(1)
    fleet.agents[killed].kill()
    at = time.time()
    done = fleet.wait_done(task_id)
    current = fleet.log(task_id)
    assert done["state"] == "success" and done["attempt"] == 2, current
    assert done["worker"].startswith(other(fleet, killed) + "@")
    runs = fleet.runs(task_id)
    assert [run.agent for run in runs] == [killed, other(fleet, killed)]
    assert runs[0].last <= at < runs[1].first
    print(f"host killed -> rerun's script: {runs[1].first - at:.1f}s")
