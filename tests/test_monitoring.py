"""Watching the fleet and the builds: agent heartbeats, live logs, cancel, retry, concurrency.

Real worker processes (the session's two nodes plus nodes started and killed
here), real gunicorn, MariaDB and Redis.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import (
    GitRepo,
    Process,
    change,
    free_port,
    gitlab_payload,
    mysql_admin,
    post_gitlab,
    task_log,
    wait_for_task,
    wait_ready,
    wait_until,
    worker_args,
)

pytestmark = pytest.mark.usefixtures("workers")


def agents(web: str) -> dict[str, dict]:
    rows = requests.get(f"{web}/api/agents", timeout=5).json()["agents"]
    return {row["hostname"].split("@")[0]: row for row in rows}


def start_build(web: str, repo: GitRepo, ci: str) -> int:
    sha = repo.commit({"ci.yaml": ci}, message="build " + uuid.uuid4().hex[:6])
    response = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def get_task(web: str, task_id: int) -> dict:
    return requests.get(f"{web}/api/tasks/{task_id}", timeout=5).json()


# --- agents ---------------------------------------------------------------------------------


def test_worker_nodes_heartbeat_into_agent_states(web):
    first = wait_until(
        lambda: (rows := agents(web)).get("node1") and rows.get("node2") and rows, 30, "agents"
    )
    for name in ("node1", "node2"):
        assert first[name]["online"] is True
        assert first[name]["concurrency"] == 3
        assert first[name]["sw_version"].startswith("opscd ")
        assert first[name]["loadavg"]
    time.sleep(4.5)  # two heartbeat intervals
    later = agents(web)
    for name in ("node1", "node2"):
        assert later[name]["last_heartbeat"] > first[name]["last_heartbeat"]
        assert later[name]["first_seen"] == first[name]["first_seen"]


def test_killed_node_goes_offline_and_comes_back(web, opscd_env, tmp_path):
    name = f"probe{uuid.uuid4().hex[:4]}"
    args = worker_args(name, "-Q", f"opscd.test.{name}")  # takes no builds
    node = Process(name, args, opscd_env, tmp_path)
    wait_ready(node)
    wait_until(lambda: agents(web).get(name, {}).get("online"), 20, f"{name} online")
    node.stop(signal.SIGKILL)  # no goodbye: only its silence tells
    killed_at = time.monotonic()
    wait_until(lambda: agents(web)[name]["online"] is False, 20, f"{name} offline")
    offline_after = float(opscd_env["CICD_AGENT_OFFLINE_AFTER"])
    assert time.monotonic() - killed_at <= offline_after + 4  # bound: setting + one heartbeat
    restarted = Process(name + "-again", args, opscd_env, tmp_path)
    try:
        wait_ready(restarted)
        wait_until(lambda: agents(web)[name]["online"], 20, f"{name} online again")
    finally:
        restarted.stop(signal.SIGTERM)
    # A graceful stop says goodbye: offline at once, not after the bound.
    assert agents(web)[name]["online"] is False
    assert agents(web)[name]["seconds_since_heartbeat"] < offline_after


def test_no_node_runs_more_than_three_builds_at_once(web, git_server):
    repo = GitRepo.create(git_server.root, f"load/app-{uuid.uuid4().hex[:6]}")
    repo.clone_url = git_server.repo_url(repo.project_path)
    ids = [start_build(web, repo, "build:\n  script: sleep 2\n") for _ in range(10)]
    most_active = {}
    while not all(get_task(web, i)["state"] in ("success", "failed") for i in ids):
        for name, row in agents(web).items():
            most_active[name] = max(most_active.get(name, 0), row["active"])
        time.sleep(0.3)
    tasks = [get_task(web, i) for i in ids]
    assert all(t["state"] == "success" for t in tasks)
    intervals: dict[str, list[tuple[str, str]]] = {}
    for task in tasks:  # a build holds its slot from its clone to its last stage
        clone, *_, last = task["stages"]
        intervals.setdefault(clone["worker"], []).append((clone["started_at"], last["finished_at"]))
    for worker, spans in intervals.items():
        events = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans])
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        assert peak <= 3, (worker, spans)
    assert max(most_active.values()) <= 3
    assert max(most_active.values()) >= 2  # builds really ran side by side


# --- live logs ------------------------------------------------------------------------------


def test_live_log_streams_lines_before_the_build_ends(web, repo):
    ci = "build:\n  script:\n    - for i in 1 2 3 4 5; do echo line $i; sleep 1; done\n"
    task_id = start_build(web, repo, ci)
    seen_running = False
    data, end = [], None
    with requests.get(
        f"{web}/api/tasks/{task_id}/log", params={"follow": 1}, stream=True, timeout=60
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "end":
                    end = line[6:]
                    break
                data.append(line[6:])
                if line == "data: line 1" and get_task(web, task_id)["state"] == "running":
                    seen_running = True
            elif not line:
                event = None
    assert seen_running, "line 1 only arrived after the build had ended"
    assert end == "success"
    assert [d for d in data if d.startswith("line ")] == [f"line {i}" for i in range(1, 6)]


def test_log_stream_resumes_after_last_event_id(web, repo):
    task = wait_for_task(web, start_build(web, repo, "build:\n  script: echo resumed\n"))
    text = requests.get(
        f"{web}/api/tasks/{task['task_id']}/log", params={"follow": 1}, timeout=10
    ).text
    ids = [int(i) for i in re.findall(r"^id: (\d+)$", text, re.M)]
    assert len(ids) >= 2 and text.rstrip().endswith("data: success")
    rest = requests.get(
        f"{web}/api/tasks/{task['task_id']}/log", params={"follow": 1},
        headers={"Last-Event-ID": str(ids[-2])}, timeout=10,
    ).text  # fmt: skip
    assert re.findall(r"^id: (\d+)$", rest, re.M) == [str(ids[-1])]


# --- cancel and retry -----------------------------------------------------------------------


def test_cancel_stops_a_running_build(web, repo, opscd_env):
    ci = "build:\n  script:\n    - echo shell=$$\n    - sleep 300\n"
    task_id = start_build(web, repo, ci)
    log = wait_until(
        lambda: "shell=" in (text := task_log(web, task_id)) and text, 30, "the build to start"
    )
    shell_pid = int(re.search(r"shell=(\d+)", log).group(1))
    response = change("post", f"{web}/api/tasks/{task_id}/cancel", timeout=5)
    assert response.status_code == 200
    assert response.json()["state"] == "canceled"
    wait_until(lambda: not Path(f"/proc/{shell_pid}").exists(), 10, "the script to be killed")
    task = wait_until(
        lambda: (t := get_task(web, task_id))["stages"][1]["state"] == "canceled" and t,
        10,
        "the build stage to end",
    )
    assert task["state"] == "canceled"
    assert task["stages"][2]["state"] is None  # publish never ran
    assert "Canceled during build" in task_log(web, task_id)
    workspaces = Path(opscd_env["CICD_WORKSPACE_DIR"]).iterdir()
    assert not [w for w in workspaces if w.name.startswith(f"task-{task_id}-")]
    again = change("post", f"{web}/api/tasks/{task_id}/cancel", timeout=5)
    assert again.status_code == 409 and "already canceled" in again.json()["error"]


def test_retry_runs_the_same_commit_as_a_new_task(web, repo):
    first = wait_for_task(web, start_build(web, repo, "build:\n  script: echo run $CI_TASK_ID\n"))
    response = change("post", f"{web}/api/tasks/{first['task_id']}/retry", timeout=5)
    assert response.status_code == 202
    retry = response.json()
    assert retry["task_id"] != first["task_id"] and retry["retry_of"] == first["task_id"]
    assert retry["commit_sha"] == first["commit_sha"]
    retry = wait_for_task(web, retry["task_id"])
    assert retry["state"] == "success"
    assert f"run {retry['task_id']}" in task_log(web, retry["task_id"])
    assert change("post", f"{web}/api/tasks/999999999/retry", timeout=5).status_code == 404


# --- the command line -----------------------------------------------------------------------


def cicd(web: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cicd.cli", *args], env={"PATH": os.environ["PATH"],
        "CICD_API_URL": web}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_shows_tasks_agents_and_logs(web, repo):
    ok = start_build(web, repo, "build:\n  script:\n    - echo from the cli\n    - sleep 2\n")
    followed = cicd(web, "logs", str(ok), "--follow")
    assert followed.returncode == 0, followed.stderr
    assert "from the cli" in followed.stdout
    assert f"build {ok} ended: success" in followed.stderr
    bad = wait_for_task(web, start_build(web, repo, "build:\n  script: exit 4\n"))["task_id"]
    assert cicd(web, "logs", str(bad), "--follow").returncode == 1
    assert "exited with code 4" in cicd(web, "logs", str(bad)).stdout

    listed = cicd(web, "tasks", "--project", repo.project_path).stdout.splitlines()
    assert listed[0].split() == ["ID", "PROJECT", "REF", "COMMIT", "STATE", "STAGE", "AGENT",
                                 "DURATION"]  # fmt: skip
    assert listed[1].split()[:2] == [str(bad), repo.project_path]
    assert "failed" in listed[1] and "success" in listed[2]
    fleet = cicd(web, "agents").stdout
    assert re.search(r"^node1@\S+\s+online\s+\d/3", fleet, re.M), fleet
    missing = cicd(web, "logs", "999999999")
    assert missing.returncode != 0 and "no task 999999999" in missing.stderr


def test_cli_logs_keep_colours_but_no_other_terminal_control(web, repo):
    """A build's output could retitle, clear or reprogram the terminal of whoever reads it:
    ``cicd logs`` shows colours (on a terminal; click drops them in a pipe) and escapes every
    other control sequence."""
    from cicd.cli import terminal_safe

    assert terminal_safe("\x1b[1;31mred\x1b[0m\x1b[2J") == "\x1b[1;31mred\x1b[0m\\x1b[2J"
    script = r"printf '\033]0;pwned\007\033[2J\033[31mred\033[0m plain\n'"
    task = wait_for_task(web, start_build(web, repo, f"build:\n  script: |\n    {script}\n"))
    for args in ([], ["--follow"]):
        shown = cicd(web, "logs", str(task["task_id"]), *args).stdout
        assert "red plain" in shown, repr(shown)
        assert "\x1b" not in shown and "\x07" not in shown
        assert "\\x1b]0;pwned\\x07" in shown  # shown, harmless


# --- Prometheus and Flower ------------------------------------------------------------------


def test_metrics_count_builds_agents_and_queues(web, repo):
    wait_for_task(web, start_build(web, repo, "build:\n  script: 'true'\n"))
    text = requests.get(f"{web}/metrics", timeout=10).text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['opscd_builds{state="success"}'] >= 1
    assert values["opscd_build_duration_seconds_count"] >= 1
    assert (
        values['opscd_build_duration_seconds_bucket{le="+Inf"}']
        == (values["opscd_build_duration_seconds_count"])
    )
    assert values["opscd_build_duration_seconds_sum"] > 0
    assert values["opscd_agents_online"] >= 2
    assert values['opscd_queue_length{queue="opscd.builds"}'] >= 0


def test_a_flood_of_scrapes_costs_the_database_almost_nothing(web):
    """/metrics counts builds over all of task_states: each web process computes it at most
    once per 5 s, however many scrapers ask (MariaDB's own SELECT counter says so)."""
    import concurrent.futures

    def selects() -> int:
        return int(mysql_admin("SHOW GLOBAL STATUS LIKE 'Com_select'")[0][1])

    requests.get(f"{web}/metrics", timeout=10)
    before = selects()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.get(f"{web}/metrics", timeout=10), range(200)))
    spent = selects() - before
    assert all(a.status_code == 200 and "opscd_builds" in a.text for a in answers)
    # 200 uncached scrapes would be 600+ SELECTs; the rest is heartbeats and reapers.
    assert spent < 150, spent


def test_flower_shows_the_workers_and_the_builds(web, repo, opscd_env, tmp_path):
    port = free_port()
    env = {**opscd_env, "CICD_FLOWER_USER": "ops", "CICD_FLOWER_PASSWORD": "flower-pw"}
    flower = Process("flower", [sys.executable, "-m", "cicd.cli", "flower", "--port", str(port)],
                     env, tmp_path)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base + "/healthcheck"), 30, "flower to answer")
        assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
        auth = ("ops", "flower-pw")
        workers = wait_until(
            lambda: (
                (r := requests.get(f"{base}/api/workers", auth=auth, timeout=30)).ok
                and len(r.json()) >= 2
                and r.json()
            ),
            60,
            "flower to list the workers",
        )
        assert {name.split("@")[0] for name in workers} >= {"node1", "node2"}
        # The dashboard lists the workers it has heard heartbeats from (every 2 s).
        wait_until(
            lambda: (
                (page := requests.get(f"{base}/workers", auth=auth, timeout=10)).ok
                and "node1@" in page.text
                and "node2@" in page.text
            ),
            20,
            "the dashboard to list both workers",
        )
        task_id = start_build(web, repo, "build:\n  script: echo seen by flower\n")
        wait_for_task(web, task_id)
        seen = wait_until(
            lambda: (
                (r := requests.get(f"{base}/api/tasks", auth=auth, timeout=10).json())
                and f"opscd-{task_id}-publish" in r
                and r
            ),
            30,
            "flower to see the build's stages",
        )
        assert seen[f"opscd-{task_id}-clone"]["name"] == "opscd.clone"
        assert seen[f"opscd-{task_id}-build"]["state"] == "SUCCESS"
        assert "flower_events_total" in requests.get(f"{base}/metrics", timeout=10).text
    finally:
        flower.stop()
    assert "flower-pw" not in " ".join(flower.popen.args)


def test_flower_refuses_to_run_without_a_login(opscd_env):
    result = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "flower"], env=opscd_env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "CICD_FLOWER_PASSWORD" in result.stderr


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


# --- agents per language --------------------------------------------------------------------


def test_builds_go_to_agents_of_their_language(start_web, isolated_env, git_server, tmp_path):
    env = isolated_env("languages")
    web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
    python_node = Process("pynode", worker_args("pynode"),
                          {**env, "CICD_WORKER_LANGUAGES": "python"}, tmp_path)  # fmt: skip
    java_node = None
    try:
        wait_ready(python_node)
        repo = GitRepo.create(git_server.root, f"lang/app-{uuid.uuid4().hex[:6]}")
        repo.clone_url = git_server.repo_url(repo.project_path)
        java = [start_build(web, repo, "build:\n  language: java\n  script: echo java\n")
                for _ in range(2)]  # fmt: skip
        # Only a python agent is up: it hands the java builds on, and they wait.
        for task_id in java:
            wait_until(lambda t=task_id: "handing the build" in task_log(web, t), 30, "hand-on")
            wait_until(lambda t=task_id: get_task(web, t)["state"] == "queued", 10, "queued")
        time.sleep(2)  # and they stay queued: no agent here builds java
        assert [get_task(web, t)["state"] for t in java] == ["queued", "queued"]
        java_node = Process("javanode", worker_args("javanode"),
                            {**env, "CICD_WORKER_LANGUAGES": "java"}, tmp_path)  # fmt: skip
        wait_ready(java_node)
        python = [start_build(web, repo, "build:\n  language: python\n  script: echo py\n")
                  for _ in range(3)]  # fmt: skip
        for task_id, node in [(t, "javanode") for t in java] + [(t, "pynode") for t in python]:
            task = wait_for_task(web, task_id)
            assert task["state"] == "success", task
            assert {s["worker"].split("@")[0] for s in task["stages"]} == {node}, task["stages"]
    finally:
        python_node.stop()
        if java_node is not None:
            java_node.stop()


def test_live_log_keeps_text_after_a_carriage_return(web, repo):
    ci = "build:\n  script:\n    - printf 'progress 10%%\\rprogress 100%%\\n'\n"
    task = wait_for_task(web, start_build(web, repo, ci))
    text = requests.get(
        f"{web}/api/tasks/{task['task_id']}/log", params={"follow": 1}, timeout=10
    ).text
    assert "data: progress 10%\ndata: progress 100%\n" in text


def test_fifty_open_log_streams_never_keep_a_webhook_waiting(web, git_server):
    """Each live log held a web thread until its build ended (days, for a build waiting for
    approval): 8 viewers and GitLab's next webhook went unanswered. Streams now hold a few
    threads for a while each; the other viewers are served in rounds and resume with
    Last-Event-ID, missing nothing."""
    import threading

    from conftest import CHANGE, GitRepo, gitlab_headers, gitlab_payload, register_project

    held = GitRepo.create(git_server.root, f"group/held-{uuid.uuid4().hex[:6]}")
    held.clone_url = git_server.repo_url(held.project_path)
    secret = register_project(web, held.project_path, held.clone_url, approval="main")
    ci = "build:\n  script: [echo first-line]\npublish: true\n"
    sha = held.commit({"ci.yaml": ci, "Dockerfile": "FROM scratch\n"})
    task_id = requests.post(f"{web}/webhooks/gitlab", headers=gitlab_headers(secret),
                            json=gitlab_payload("push-event.json", held, "refs/heads/main", sha),
                            timeout=10).json()["task_id"]  # fmt: skip
    wait_until(lambda: get_task(web, task_id)["state"] == "waiting", 60, "waiting for approval")
    stop = threading.Event()

    def viewer() -> None:  # as EventSource does: read, and reconnect when the stream ends
        last = None
        while not stop.is_set():
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with requests.get(f"{web}/api/tasks/{task_id}/log", params={"follow": 1},
                                  headers=headers, stream=True, timeout=60) as stream:  # fmt: skip
                    for line in stream.iter_lines(decode_unicode=True):
                        if line.startswith("id: "):
                            last = line[4:]
                        if stop.is_set() or line.startswith("event: end"):
                            return
            except requests.RequestException:
                pass
            stop.wait(1)

    viewers = [threading.Thread(target=viewer, daemon=True) for _ in range(50)]
    for thread in viewers:
        thread.start()
    try:
        time.sleep(2)  # every viewer has connected
        other = GitRepo.create(git_server.root, f"group/busy-{uuid.uuid4().hex[:6]}")
        other.clone_url = git_server.repo_url(other.project_path)
        other_secret = register_project(web, other.project_path, other.clone_url)
        sha = other.commit({"ci.yaml": "build:\n  script: 'true'\n"})
        payload = gitlab_payload("push-event.json", other, "refs/heads/main", sha)
        # GitLab gives up after 10 s; the answer must come well within that.
        answer = requests.post(f"{web}/webhooks/gitlab", json=payload,
                               headers=gitlab_headers(other_secret), timeout=2)  # fmt: skip
        assert answer.status_code == 202, answer.text
        assert requests.get(f"{web}/api/tasks", timeout=2).status_code == 200
        rejected = requests.post(f"{web}/api/tasks/{task_id}/reject", headers=CHANGE, timeout=2)
        assert rejected.status_code == 200, rejected.text
        followed = cicd(web, "logs", str(task_id), "--follow")  # resumes through the rounds
    finally:
        stop.set()
        for thread in viewers:
            thread.join(10)
    assert followed.returncode == 1 and "ended: canceled" in followed.stderr, followed.stderr
    assert "\nfirst-line\n" in followed.stdout and "waits for approval" in followed.stdout
