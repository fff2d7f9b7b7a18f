"""Agent identity, tried from outside: `cicd agents add|disable|enable|revoke` on a real MariaDB
or PostgreSQL and a real Redis (ACL users), Procfile workers logging in with what `add` printed.

One installation of its own (database, broker keys): registering agents there makes the
nodes on shared credentials take no builds, which must not touch the session's stacks.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import requests
from conftest import (
    DATABASES,
    ROOT,
    GitRepo,
    gitlab_payload,
    post_gitlab,
    procfile_worker,
    task_log,
    wait_for_task,
    wait_ready,
)
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from support.processes import wait_until
from support.services import PrivatePostgreSQL
from test_reliability import opscd_database


def cicd(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "cicd.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def issued(stdout: str) -> dict[str, str]:
    """The settings `cicd agents add` printed (KEY=VALUE lines, shell-quoted)."""
    import shlex

    pairs = (shlex.split(line)[0].partition("=") for line in stdout.splitlines() if "=" in line)
    return {key: value for key, _, value in pairs}


def push(web: str, repo: GitRepo, script: str) -> int:
    sha = repo.commit({"ci.yaml": f"build:\n  script: {script}\n"}, message=uuid.uuid4().hex[:6])
    answer = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
    assert answer.status_code == 202, answer.text
    return answer.json()["task_id"]


def state(web: str, task_id: int) -> dict:
    return requests.get(f"{web}/api/tasks/{task_id}", timeout=5).json()


def fleet(web: str) -> dict:
    return requests.get(f"{web}/api/agents", timeout=5).json()


def node(web: str, prefix: str) -> dict | None:
    return next((n for n in fleet(web)["agents"] if n["hostname"].startswith(prefix + "@")), None)


#: What each database answers a login it refuses (a wrong token, a dropped account).
LOGIN_REFUSED = {"mariadb": "Access denied", "postgresql": "password authentication failed"}


@pytest.fixture(params=DATABASES)
def agents_database(request, tmp_path) -> Iterator[dict[str, str]]:
    """The installation's database: MariaDB (a database on the session's server), or a
    PostgreSQL cluster of its own, whose TCP logins need a password (the session's server
    trusts every login on loopback, so it could not refuse a wrong token)."""
    if request.param == "mariadb":
        yield {}
        return
    server = PrivatePostgreSQL().start()
    try:
        yield {"CICD_DATABASE_URL": opscd_database(server)}
    finally:
        server.remove()


def test_registered_agents_take_builds_and_disabled_or_revoked_ones_do_not(
    agents_database, isolated_env, start_web, git_server, tmp_path
):
    dialect = "postgresql" if agents_database else "mariadb"
    env = isolated_env(f"agents-{dialect}", CICD_AGENT_OFFLINE_AFTER="8", **agents_database)
    web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
    tag = uuid.uuid4().hex[:4]
    name = f"build-{tag}"
    repo = GitRepo.create(git_server.root, f"agents/app-{tag}")
    repo.clone_url = git_server.repo_url(repo.project_path)

    added = cicd(env, "agents", "add", name)
    assert "aclfile" in added.stderr  # the shared Redis keeps ACL users in memory: said so
    credentials = issued(added.stdout)
    assert credentials["CICD_AGENT_NAME"] == name
    account = make_url(credentials["CICD_DATABASE_URL"]).username
    token = make_url(credentials["CICD_DATABASE_URL"]).password
    assert credentials["CICD_BROKER_URL"].startswith(f"redis://{account}:")
    again = cicd(env, "agents", "add", name, ok=False)
    assert again.returncode != 0 and "registered already" in again.stderr

    # What the agent's credentials may not do: keys and channels outside OpsCD's prefix,
    # server administration, and writing projects, secrets or agents.
    broker = redis.Redis.from_url(credentials["CICD_BROKER_URL"])
    assert broker.ping()
    for command in (("GET", "not-opscd"), ("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*"),
                    ("ACL", "LIST"), ("PUBLISH", "elsewhere", "x")):  # fmt: skip
        with pytest.raises(redis.exceptions.NoPermissionError):
            broker.execute_command(*command)
    broker.close()
    # A login of its own on the database: it reads, and writes only the workers' tables.
    as_agent = create_engine(credentials["CICD_DATABASE_URL"])
    with as_agent.connect() as connection:
        connection.exec_driver_sql("SELECT COUNT(*) FROM projects")
        connection.exec_driver_sql("SELECT COUNT(*) FROM agent_states")
        connection.rollback()
        refused = (
            "UPDATE projects SET clone_url = 'http://evil/'",
            "DELETE FROM project_secrets",
            "UPDATE agents SET enabled = true",
            "UPDATE task_details SET clone_url = 'x'",
        )
        for sql in refused:
            with pytest.raises(DBAPIError, match="denied"):
                connection.exec_driver_sql(sql)
            connection.rollback()

    agent_env = {**env, **credentials}
    nodes = {
        "agent": procfile_worker(name, agent_env, tmp_path, CICD_WORKER_CONCURRENCY="2"),
        "shared": procfile_worker(f"shared-{tag}", env, tmp_path, CICD_WORKER_CONCURRENCY="2"),
        # The right account with a wrong token: the broker and the database refuse it.
        "forged": procfile_worker(f"forged-{tag}", {**agent_env, "CICD_BROKER_URL": credentials[
            "CICD_BROKER_URL"].replace(token, "wrong" + token[5:]), "CICD_DATABASE_URL":
            credentials["CICD_DATABASE_URL"].replace(token, "wrong" + token[5:])}, tmp_path),
    }  # fmt: skip
    try:
        wait_ready(nodes["agent"])
        wait_ready(nodes["shared"])

        # Who a node is comes from its database login, not its name.
        wait_until(lambda: (node(web, name) or {}).get("agent") == name, 20, "the agent's identity")
        shared = wait_until(lambda: node(web, f"shared-{tag}"), 20, "the shared node's row")
        assert shared["agent"] is None and shared["refused"] == "no agent credentials"
        assert not any(n["hostname"].startswith(f"forged-{tag}@") for n in fleet(web)["agents"])
        registered = wait_until(
            lambda: next((a for a in fleet(web)["registered"]
                          if a["name"] == name and a["refused_logins"]), None),
            30, "the forged node's refused logins to show",
        )  # fmt: skip
        assert registered["state"] == "enabled" and registered["broker_user"] is True
        page = requests.get(f"{web}/agents", timeout=5).text
        assert f'data-registered-agent="{name}" data-state="enabled"' in page
        assert "takes no builds: no agent credentials" in page

        # Only the registered agent builds; the shared node and the forged one get nothing.
        first = [push(web, repo, "echo built") for _ in range(3)]
        for task_id in first:
            done = wait_for_task(web, task_id, 60)
            assert done["state"] == "success", task_log(web, task_id)
            assert done["worker"].startswith(f"{name}@"), done["worker"]

        # Disabled: no new build within one heartbeat (2 s); the build it runs goes on.
        long = push(web, repo, "sleep 6; echo long done")
        wait_until(lambda: state(web, long)["state"] == "running", 30, "the long build to start")
        cicd(env, "agents", "disable", name)
        time.sleep(4)
        waiting = push(web, repo, "echo after disable")
        time.sleep(8)
        assert state(web, waiting)["state"] == "queued", task_log(web, waiting)
        finished = wait_for_task(web, long, 60)
        assert finished["state"] == "success" and "long done" in task_log(web, long)
        assert node(web, name)["refused"] == f"agent {name} is disabled"
        assert state(web, waiting)["state"] == "queued"

        cicd(env, "agents", "enable", name)
        done = wait_for_task(web, waiting, 60)
        assert done["state"] == "success" and done["worker"].startswith(f"{name}@")

        # Revoked: its users are gone and its connections cut; it can do nothing more. With
        # no agent registered any more, the node on shared credentials builds again.
        cicd(env, "agents", "revoke", name)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(credentials["CICD_BROKER_URL"]).ping()
        as_agent.dispose()
        with pytest.raises(DBAPIError, match=LOGIN_REFUSED[dialect]):
            as_agent.connect()
        after = push(web, repo, "echo after revoke")
        done = wait_for_task(web, after, 60)
        assert done["state"] == "success" and done["worker"].startswith(f"shared-{tag}@")
        listed = cicd(env, "agents", "--url", web).stdout
        assert name in listed and "revoked" in listed
        assert nodes["shared"].popen.poll() is None, nodes["shared"].output()
        forged = nodes["forged"].output()
        assert LOGIN_REFUSED[dialect] in forged or "invalid username-password" in forged, forged
    finally:
        for process in nodes.values():
            process.stop()
            print(f"--- {process.name}\n{process.output()[-6000:]}")
        cicd(env, "agents", "revoke", name, ok=False)  # never leave a user behind on a failure
