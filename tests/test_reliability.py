"""Faults OpsCD must survive, each rehearsed with real processes: nothing lost, nothing twice.

Killed workers and hosts, a broker and a database that restart, a crash between
recording a build and sending it, a burst of pushes to one branch.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pymysql
import pytest
import requests
from conftest import (
    BROKERS,
    DATABASES,
    GitRepo,
    Process,
    gitlab_payload,
    mysql_admin,
    post_gitlab,
    private_broker,
    procfile_worker,
    task_log,
    wait_for_task,
    wait_ready,
    wait_until,
    worker_args,
)
from support.services import PrivateMariaDB, PrivatePostgreSQL


def new_repo(git_server, name: str) -> GitRepo:
    repo = GitRepo.create(git_server.root, f"faults/{name}-{uuid.uuid4().hex[:6]}")
    repo.clone_url = git_server.repo_url(repo.project_path)
    return repo


def push(web: str, repo: GitRepo, ci: str, branch: str = "main", **kwargs) -> requests.Response:
    sha = repo.commit({"ci.yaml": ci}, message=f"push {uuid.uuid4().hex[:6]}", branch=branch)
    return post_gitlab(web, gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha),
                       **kwargs)  # fmt: skip


def task(web: str, task_id: int) -> dict:
    return requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()


def test_killed_worker_build_reruns_on_another_node(broker, start_stack, git_server, tmp_path):
    """On Redis the reaper reruns it once the node's heartbeats are overdue; on RabbitMQ the
    broker gives the dead node's stage back at once, with no reaper (its bound is 2 min)."""
    offline_after = "120" if broker else "4"
    stack = start_stack(f"victim-{'amqp' if broker else 'redis'}",
                        CICD_AGENT_OFFLINE_AFTER=offline_after, CICD_REAPER_INTERVAL="1",
                        **broker)  # fmt: skip
    repo = new_repo(git_server, "killed")
    ci = "build:\n  script:\n    - echo run on $HOSTNAME attempt\n    - sleep 5\n    - echo done\n"
    task_id = push(stack.web, repo, ci).json()["task_id"]
    wait_until(lambda: task(stack.web, task_id)["stage"] == "build", 30, "the build to start")
    stack.worker.stop(signal.SIGKILL)  # the node and its pool die mid-build
    rescuer = Process("rescuer", worker_args("rescuer"), stack.env, tmp_path)
    try:
        wait_ready(rescuer)
        done = wait_for_task(stack.web, task_id, timeout=60)
    finally:
        rescuer.stop()
    assert done["state"] == "success", task_log(stack.web, task_id)
    assert done["worker"].startswith("rescuer@")
    assert {s["worker"].split("@")[0] for s in done["stages"]} == {"rescuer"}
    log = task_log(stack.web, task_id)
    why = "lost its broker connection" if broker else "stopped responding"
    assert f"agent victim-{'amqp' if broker else 'redis'}@" in log and why in log, log
    assert "running it again" in log
    assert log.count("\ndone\n") == 1


def test_a_killed_pool_process_build_runs_again_and_succeeds_once(broker, start_stack, git_server):
    """The pool process running a build dies (OOM killer, a crash) and its node lives on."""
    import psutil

    stack = start_stack(f"pool-{'amqp' if broker else 'redis'}", CICD_AGENT_OFFLINE_AFTER="120",
                        **broker)  # fmt: skip
    repo = new_repo(git_server, "pool")
    ci = "build:\n  script:\n    - echo script=$$\n    - sleep 4\n    - echo done $CI_TASK_ID\n"
    task_id = push(stack.web, repo, ci).json()["task_id"]
    found = wait_until(lambda: re.search(r"script=(\d+)", task_log(stack.web, task_id)), 30,
                       "the build to start")  # fmt: skip
    script = psutil.Process(int(found.group(1)))
    main = stack.worker.popen.pid
    pool = next(p for p in script.parents() if p.ppid() == main)
    pool.kill()
    done = wait_for_task(stack.web, task_id, timeout=90)
    log = task_log(stack.web, task_id)
    assert done["state"] == "success", log
    assert log.count(f"done {task_id}\n") == 1, log
    assert stack.worker.popen.poll() is None, stack.worker.output()


def test_a_worker_host_that_restarts_runs_its_build_again_once(start_stack, git_server):
    env = {"CICD_MAX_BUILD_TIMEOUT": "6", "CICD_BUILD_TIMEOUT": "6",
           "CICD_VISIBILITY_TIMEOUT": "8", "CICD_AGENT_OFFLINE_AFTER": "60"}  # fmt: skip
    stack = start_stack("host", **env)
    repo = new_repo(git_server, "host")
    ci = "build:\n  script:\n    - echo started\n    - sleep 3\n    - echo finished\n"
    task_id = push(stack.web, repo, ci).json()["task_id"]
    wait_until(lambda: "started" in task_log(stack.web, task_id), 30, "the build to start")
    stack.worker.stop(signal.SIGKILL)  # the whole host goes: main process and pool
    again = Process("host-again", stack.worker.popen.args, stack.env, stack.worker.log_path.parent)
    try:
        wait_ready(again)
        done = wait_for_task(stack.web, task_id, timeout=90)
    finally:
        again.stop()
    assert done["state"] == "success", task_log(stack.web, task_id)
    log = task_log(stack.web, task_id)
    assert log.count("\nfinished\n") == 1  # completed once
    assert log.count("Build succeeded") == 1
    # Sooner than the offline bound: the node itself reruns what its former life left
    # running; Redis's redelivery of the old attempt (visibility timeout) is ignored.
    assert "restarted during the build" in log


@pytest.mark.parametrize("kind", BROKERS)
def test_a_broker_restart_loses_nothing_and_runs_nothing_twice(
    kind, start_stack, git_server, tmp_path
):
    """Builds queued and in flight when the broker restarts all end once, and a push during
    the outage is refused (503) and built when GitLab delivers it again. On RabbitMQ a build
    in flight runs again from its clone (its stages were unacknowledged: RabbitMQ gives them
    back when the connections drop), and its log is that of the run that ended."""
    broker, settings = private_broker(kind, tmp_path)
    try:
        stack = start_stack(f"brokerfault-{kind}", **settings)
        repo = new_repo(git_server, kind)
        ci = "build:\n  script:\n    - sleep 1\n    - echo built $CI_TASK_ID\n"
        ids = [push(stack.web, repo, ci).json()["task_id"] for _ in range(5)]
        broker.stop()
        delivery = str(uuid.uuid4())
        outage = push(stack.web, repo, ci, delivery=delivery)
        assert outage.status_code == 503  # GitLab will redeliver
        time.sleep(2)
        broker.start()
        redelivered = push(stack.web, repo, ci, delivery=delivery)
        assert redelivered.status_code == 202
        ids.append(redelivered.json()["task_id"])
        for task_id in ids:
            done = wait_for_task(stack.web, task_id, timeout=150)
            assert done["state"] == "success", (task_id, task_log(stack.web, task_id))
            assert task_log(stack.web, task_id).count(f"built {task_id}\n") == 1
    finally:
        broker.stop()


def opscd_database(server: PrivateMariaDB | PrivatePostgreSQL) -> str:
    """A database ``opscd`` with OpsCD's schema on the private server; its URL."""
    if isinstance(server, PrivatePostgreSQL):
        with psycopg.connect(server.url("postgres").replace("+psycopg", ""),
                             autocommit=True) as connection:  # fmt: skip
            connection.execute("CREATE DATABASE opscd ENCODING 'UTF8' TEMPLATE template0")
    else:
        connection = pymysql.connect(host="127.0.0.1", port=server.port, user="root")
        with connection, connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE opscd CHARACTER SET utf8mb4")
    url = server.url("opscd")
    subprocess.run([sys.executable, "-m", "cicd.cli", "init-db"], check=True,
                   env={"PATH": "/usr/bin:/bin", "CICD_DATABASE_URL": url})  # fmt: skip
    return url


def private_database(dialect: str, tmp_path) -> PrivateMariaDB | PrivatePostgreSQL:
    """A database server of the test's own, started."""
    if dialect == "postgresql":
        return PrivatePostgreSQL().start()
    return PrivateMariaDB(tmp_path / "mariadb").start()


@pytest.mark.parametrize("dialect", DATABASES)
def test_a_database_restart_answers_503_and_keeps_every_state_and_log_line(
    dialect, start_stack, git_server, tmp_path
):
    server = private_database(dialect, tmp_path)
    try:
        url = opscd_database(server)
        # An outage shorter than the node's lease (CICD_AGENT_OFFLINE_AFTER less the margin):
        # the build goes on through it, as one run.
        stack = start_stack(f"dbfault-{dialect}", CICD_DATABASE_URL=url,
                            CICD_AGENT_OFFLINE_AFTER="40")  # fmt: skip
        repo = new_repo(git_server, "db")
        ci = "build:\n  script:\n    - for i in $(seq 1 16); do echo line $i; sleep 0.5; done\n"
        task_id = push(stack.web, repo, ci).json()["task_id"]
        wait_until(lambda: "line 2" in task_log(stack.web, task_id), 30, "output")
        server.stop()
        started = time.monotonic()
        during = push(stack.web, repo, ci)
        assert during.status_code == 503 and "database" in during.json()["error"]
        assert time.monotonic() - started < 8  # GitLab waits only a few seconds
        time.sleep(3)
        server.start()
        done = wait_for_task(stack.web, task_id, timeout=120)
        assert done["state"] == "success" and done["attempt"] == 1, task_log(stack.web, task_id)
        log = task_log(stack.web, task_id)
        assert [line for line in log.splitlines() if line.startswith("line ")] == [
            f"line {i}" for i in range(1, 17)
        ]
    finally:
        server.stop()
        if isinstance(server, PrivatePostgreSQL):
            server.remove()


def insert_task(database_url: str, repo: GitRepo, sha: str, created: str, **state: str) -> int:
    """Task rows written straight into the database, as a fault leaves them; the task's id.

    ``state``: task_states columns; values are SQL (``NOW(6)``) except the
    quoted names ``state``, ``stage`` and ``worker``.
    """
    database = database_url.rsplit("/", 1)[1].split("?")[0]
    mysql_admin(  # the project is registered, as any project with builds is
        "INSERT IGNORE INTO projects (path, forge, clone_url, webhook_secret_sha256,"
        " protected_refs, approval_refs, created_at, updated_at) VALUES"
        f" ('{repo.project_path}', 'gitlab', '{repo.clone_url}', '{'0' * 64}', 'main', '',"
        " NOW(6), NOW(6))",
        database=database,
    )
    mysql_admin(
        "INSERT INTO task_details (forge, project, clone_url, ref_type, ref_name, commit_sha,"
        f" created_at) VALUES ('gitlab', '{repo.project_path}', '{repo.clone_url}', 'branch',"
        f" 'main', '{sha}', {created})",
        database=database,
    )
    task_id = mysql_admin("SELECT MAX(id) FROM task_details", database=database)[0][0]
    columns = {"queued_at": "NOW(6)", "updated_at": "NOW(6)", "attempt": "1"}
    for name, value in state.items():
        columns[name] = f"'{value}'" if name in ("state", "stage", "worker") else value
    mysql_admin(
        f"INSERT INTO task_states (task_id, {', '.join(columns)}) VALUES"
        f" ({task_id}, {', '.join(columns.values())})",
        database=database,
    )
    return task_id


@pytest.mark.usefixtures("workers")
def test_recorded_but_never_sent_build_is_sent_by_the_reconciler(web, database_url, repo):
    sha = repo.commit({"ci.yaml": "build:\n  script: echo reconciled\n"})
    # What a web process that crashed between its commit and its send leaves behind.
    ago = "NOW(6) - INTERVAL 5 MINUTE"
    task_id = insert_task(database_url, repo, sha, ago, state="queued", queued_at=ago)
    done = wait_for_task(web, task_id, timeout=60)  # a worker's sweep every 10 s
    assert done["state"] == "success" and done["enqueued_at"]
    assert "reconciled" in task_log(web, task_id)


@pytest.mark.usefixtures("workers")
def test_a_burst_of_pushes_to_one_branch_is_all_recorded_and_superseded(
    broker, start_web, start_stack, git_server
):
    """A flood: 100 pushes at once, 16 at a time; on RabbitMQ, every 202 is confirmed."""
    if broker:  # an installation of its own on RabbitMQ, with one node
        web = start_stack("burst-amqp", CICD_AUTO_CANCEL="true", **broker).web
    else:
        web = start_web(CICD_AUTO_CANCEL="true")
    repo = new_repo(git_server, "burst")
    sha = repo.commit({"ci.yaml": "build:\n  script: sleep 1\n"})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post_gitlab(web, payload), range(100)))
    assert [a.status_code for a in answers] == [202] * 100
    ids = sorted(a.json()["task_id"] for a in answers)
    assert len(set(ids)) == 100
    listed = requests.get(
        f"{web}/api/tasks", params={"project": repo.project_path, "limit": 200}, timeout=10
    ).json()
    assert len(listed["tasks"]) == 100  # every accepted delivery is recorded
    newest = wait_for_task(web, ids[-1], timeout=120)
    assert newest["state"] == "success"
    states = [wait_for_task(web, i, timeout=120)["state"] for i in ids[:-1]]
    assert states.count("canceled") >= 90  # superseded before they ran
    assert set(states) <= {"canceled", "success"}


# --- outages with builds in flight, Procfile workers ------------------------------------------


def outage_stack(isolated_env, start_web, tmp_path, name: str, **settings: str):
    """A web process and two Procfile worker nodes of an installation of their own."""
    env = isolated_env(name, CICD_AGENT_OFFLINE_AFTER="4", CICD_REAPER_INTERVAL="1", **settings)
    web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
    tag = uuid.uuid4().hex[:4]
    nodes = []
    for side in ("a", "b"):  # one after the other: their heartbeats are not in step
        nodes.append(procfile_worker(f"{name}{side}{tag}", env, tmp_path))
        wait_ready(nodes[-1])
        time.sleep(1)
    return web, nodes


def agents_online(web: str, nodes: list[Process]) -> bool:
    rows = requests.get(f"{web}/api/agents", timeout=5).json()["agents"]
    online = {row["hostname"].split("@")[0] for row in rows if row["online"]}
    return all(node.name in online for node in nodes)


def assert_ran_once_and_nodes_survived(
    web: str, nodes: list[Process], task_id: int, reruns: int = 0
) -> None:
    """The build succeeded once after at most ``reruns`` runs were given up, and no node died."""
    done = wait_for_task(web, task_id, timeout=150)
    log = task_log(web, task_id)
    assert done["state"] == "success", log
    assert log.count(f"ran {task_id}\n") == 1 and done["attempt"] <= 1 + reruns, (done, log)
    if not reruns:
        assert "running it again" not in log, log
    for node in nodes:
        assert node.popen.poll() is None, node.output()  # no node died
        assert "Unrecoverable error" not in node.output()
    wait_until(lambda: agents_online(web, nodes), 20, "both nodes online")


INFLIGHT_CI = "build:\n  script:\n    - echo started $CI_TASK_ID\n    - sleep 10\n    - echo ran $CI_TASK_ID\n"  # noqa: E501


@pytest.mark.parametrize("kind", BROKERS)
def test_nodes_outlive_a_broker_restart_with_a_build_in_flight(
    kind, isolated_env, start_web, git_server, tmp_path
):
    """No node dies with its broker, none looks dead meanwhile, and both consume again. On
    Redis the build in flight goes on through the outage as one run; on RabbitMQ it runs
    again once, from its clone (RabbitMQ gave its stage back when the connection dropped)."""
    broker, settings = private_broker(kind, tmp_path)
    nodes: list[Process] = []
    try:
        web, nodes = outage_stack(isolated_env, start_web, tmp_path, f"brk{kind[:1]}", **settings)
        repo = new_repo(git_server, "broker-restart")
        task_id = push(web, repo, INFLIGHT_CI).json()["task_id"]
        wait_until(lambda: f"started {task_id}" in task_log(web, task_id), 30, "the build")
        broker.stop()
        time.sleep(8)  # longer than CICD_AGENT_OFFLINE_AFTER: nodes must not look dead
        assert agents_online(web, nodes)
        broker.start()
        assert_ran_once_and_nodes_survived(web, nodes, task_id, reruns=1 if kind == "rabbitmq"
                                           else 0)  # fmt: skip
        after = push(web, repo, INFLIGHT_CI.replace("sleep 10", "sleep 0")).json()["task_id"]
        done = wait_for_task(web, after, timeout=90)  # the nodes consume again
        assert done["state"] == "success", (done, task_log(web, after))
    finally:
        for node in nodes:
            node.stop()
        broker.stop()


def test_a_database_outage_longer_than_the_lease_stops_builds_and_runs_each_again_once(
    isolated_env, start_web, git_server, tmp_path
):
    """Nodes that cannot reach the database cannot tell an outage from their own partition:
    past their lease they stop their builds (another node may run them again from then on);
    once the database answers, each build runs again, once, and the nodes live on."""
    server = PrivateMariaDB(tmp_path / "mariadb").start()
    nodes: list[Process] = []
    try:
        url = opscd_database(server)
        web, nodes = outage_stack(isolated_env, start_web, tmp_path, "dbo", CICD_DATABASE_URL=url)
        repo = new_repo(git_server, "db-outage")
        ci = INFLIGHT_CI.replace("sleep 10", "sleep 20")  # no first run ends before the cut
        ids = [push(web, repo, ci).json()["task_id"] for _ in range(4)]
        for task_id in ids:  # 4 builds, at most 3 a node: both nodes have builds in flight
            wait_until(lambda i=task_id: f"started {i}" in task_log(web, i), 30, "the builds")
        assert len({task(web, i)["worker"] for i in ids}) == 2
        server.stop()
        time.sleep(9)  # longer than the lease (3 s) and than CICD_AGENT_OFFLINE_AFTER (4 s)
        server.start()
        for task_id in ids:
            done = wait_for_task(web, task_id, timeout=150)
            current = task_log(web, task_id)
            assert done["state"] == "success" and done["attempt"] == 2, current
            assert "lost its connection to the database" in current
            assert current.count(f"ran {task_id}\n") == 1, current
            first = requests.get(f"{web}/api/tasks/{task_id}/log", params={"attempt": 1},
                                 timeout=10).text  # fmt: skip
            assert "run 1 was superseded by run 2" in first and f"ran {task_id}" not in first
        for node in nodes:
            assert node.popen.poll() is None, node.output()
            assert "Unrecoverable error" not in node.output()
        wait_until(lambda: agents_online(web, nodes), 20, "both nodes online")
    finally:
        for node in nodes:
            node.stop()
        server.stop()


def test_a_build_whose_next_stage_message_was_lost_runs_again(start_stack, git_server):
    """Redis's pop and kombu's unacked entry are two commands: a message can vanish between."""
    stack = start_stack("lost", CICD_AGENT_OFFLINE_AFTER="4", CICD_REAPER_INTERVAL="1")
    repo = new_repo(git_server, "lost")
    sha = repo.commit({"ci.yaml": "build:\n  script: echo found again\n"})
    node = worker_args("lost")[worker_args("lost").index("-n") + 1]
    # What the node holds after such a loss: the build running here, no message of it.
    task_id = insert_task(stack.env["CICD_DATABASE_URL"], repo, sha, "NOW(6)", state="running",
                          stage="build", worker=node, enqueued_at="NOW(6)",
                          started_at="NOW(6)")  # fmt: skip
    done = wait_for_task(stack.web, task_id, timeout=60)
    log = task_log(stack.web, task_id)
    assert done["state"] == "success", log
    assert "lost its next stage" in log and "found again" in log
    assert stack.worker.popen.poll() is None


def test_a_run_taken_for_dead_stops_and_leaves_the_rerun_its_own_log(
    start_stack, git_server, tmp_path
):
    """A node whose main process hangs (no heartbeat) while its build runs is taken for dead:
    the build runs again elsewhere. The first run, still alive, must stop its script and
    write nothing into the new run's log or result (fencing by run)."""
    stack = start_stack("hung", CICD_AGENT_OFFLINE_AFTER="4", CICD_REAPER_INTERVAL="1")
    marks = tmp_path / "marks"
    marks.mkdir()
    ci = (
        "build:\n  script:\n"
        f"    - if mkdir {marks}/first; then echo first-run; sleep 40; touch {marks}/finished;"
        " echo first-finished; else echo second-run; fi\n"
    )
    repo = new_repo(git_server, "fenced")
    task_id = push(stack.web, repo, ci).json()["task_id"]
    wait_until(lambda: "first-run" in task_log(stack.web, task_id), 30, "the first run's script")
    os.kill(stack.worker.pid, signal.SIGSTOP)  # the node's main process: no more heartbeats
    rescuer = Process("rescuer-fenced", worker_args("rescuer-fenced"), stack.env, tmp_path)

    def first() -> str:
        url = f"{stack.web}/api/tasks/{task_id}/log"
        return requests.get(url, params={"attempt": 1}, timeout=10).text

    try:
        wait_ready(rescuer)
        done = wait_for_task(stack.web, task_id, timeout=90)
        wait_until(lambda: "superseded" in first(), 30, "the first run to learn it was replaced")
    finally:
        os.kill(stack.worker.pid, signal.SIGCONT)
        rescuer.stop()
    current = task_log(stack.web, task_id)
    assert done["state"] == "success" and done["attempt"] == 2, current
    assert done["worker"].startswith("rescuer-fenced@")
    assert "\nsecond-run\n" in current and "\nfirst-run\n" not in current
    assert current.count("Build succeeded") == 1
    earlier = first()
    assert earlier.startswith(f"[opscd] run 1 of build {task_id}, replaced by run 2")
    assert "\nfirst-run\n" in earlier and "run 1 was superseded by run 2" in earlier
    assert "\nfirst-finished\n" not in earlier + current
    assert not (marks / "finished").exists(), "the first run's script was not stopped"
    page = requests.get(f"{stack.web}/tasks/{task_id}", timeout=10).text
    assert f"/api/tasks/{task_id}/log?attempt=1" in page
