"""The per-node build cap, tried from outside: Procfile workers, pushes, what the API shows.

A node runs at most ``CICD_WORKER_CONCURRENCY`` builds from the start of their
clone to the end of their last stage; builds beyond every node's capacity wait
in the shared queue, and no build waits between its stages while it runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import requests
from conftest import (
    DATABASES,
    ROOT,
    GitRepo,
    gitlab_payload,
    post_gitlab,
    procfile_worker,
    task_log,
    wait_ready,
)

FINISHED = {"success", "failed", "canceled"}


def push(web: str, repo: GitRepo, ci: str) -> int:
    sha = repo.commit({"ci.yaml": ci}, message=f"push {uuid.uuid4().hex[:6]}")
    response = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def peak_overlap(spans: list[tuple[dt.datetime, dt.datetime]]) -> int:
    """The most spans that were open at one instant (a span ending as another starts: not both)."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_two_nodes_never_carry_more_than_their_cap_of_builds(
    broker, isolated_env, start_web, git_server, tmp_path
):
    name = "capacity-amqp" if broker else "capacity"
    env = isolated_env(name, CICD_AGENT_OFFLINE_AFTER="20", **broker)
    web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
    tag = uuid.uuid4().hex[:4]
    nodes = [
        procfile_worker(f"cap{side}{tag}", env, tmp_path, CICD_WORKER_CONCURRENCY="3")
        for side in ("a", "b")
    ]
    try:
        for node in nodes:
            wait_ready(node)
        repo = GitRepo.create(git_server.root, f"capacity/app-{tag}")
        repo.clone_url = git_server.repo_url(repo.project_path)
        ids = [push(web, repo, "build:\n  script: sleep 6\n") for _ in range(8)]

        seen: dict[str, int] = {}  # the most builds the API showed running per node at once
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listed = requests.get(f"{web}/api/tasks", params={"limit": 20}, timeout=5).json()
            running: dict[str, int] = {}
            for task in listed["tasks"]:
                if task["state"] == "running" and task["worker"]:
                    running[task["worker"]] = running.get(task["worker"], 0) + 1
            for worker, count in running.items():
                seen[worker] = max(seen.get(worker, 0), count)
            if all(t["state"] in FINISHED for t in listed["tasks"]):
                break
            time.sleep(0.3)
        tasks = [requests.get(f"{web}/api/tasks/{i}", timeout=5).json() for i in ids]
        for node in nodes:
            assert node.popen.poll() is None, node.output()
    finally:
        for node in nodes:
            node.stop()

    assert [t["state"] for t in tasks] == ["success"] * 8, [task_log(web, i) for i in ids]
    assert seen and max(seen.values()) <= 3, seen
    spans: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
    for task in tasks:
        stages = {s["stage"]: s for s in task["stages"]}
        workers = {s["worker"] for s in task["stages"] if s["worker"]}
        assert len(workers) == 1, task  # every stage on the node that cloned
        start = when(stages["clone"]["started_at"])
        end = max(when(s["finished_at"]) for s in task["stages"] if s["finished_at"])
        spans.setdefault(workers.pop(), []).append((start, end))
        # The build stage began right after the clone: it never waited for a slot.
        waited = when(stages["build"]["started_at"]) - when(stages["clone"]["finished_at"])
        assert waited < dt.timedelta(seconds=1.5), (task["id"], waited)
    peaks = {worker: peak_overlap(node_spans) for worker, node_spans in spans.items()}
    assert len(peaks) == 2 and all(peak <= 3 for peak in peaks.values()), (peaks, spans)
    assert max(peaks.values()) == 3  # the nodes were really full: the cap was what held


CLAIM_RACE = """
import json, sys, threading
from cicd import db
from cicd.config import load_settings
from cicd.models import RefType, TaskDetail, TaskState, TaskStatus
from workers.capacity import Claim, claim_slot

db.configure(load_settings())
db.migrate()
with db.session() as session:
    tasks = [TaskDetail(forge="gitlab", project="race/app", clone_url="http://127.0.0.1:9/x.git",
                        ref_type=RefType.BRANCH, ref_name="main", commit_sha="0" * 40)
             for _ in range(6)]
    session.add_all(tasks)
    session.flush()
    session.add_all(TaskStatus(task_id=t.id, state=TaskState.QUEUED, attempt=1) for t in tasks)
    session.commit()
    ids = [t.id for t in tasks]
start, results = threading.Barrier(len(ids)), {}

def claim(task_id):
    start.wait()
    results[task_id] = claim_slot(task_id, 1, "racer@host", 3).value

threads = [threading.Thread(target=claim, args=(i,)) for i in ids]
for thread in threads: thread.start()
for thread in threads: thread.join()
again = claim_slot(ids[-1], 2, "racer@host", 3).value  # an older attempt's message
json.dump({"claims": sorted(results.values()), "again": again}, sys.stdout)
"""


@pytest.mark.parametrize("backend", [*DATABASES, "sqlite"])
def test_six_clones_claiming_three_slots_at_once_get_three(backend, make_database, tmp_path):
    if backend != "sqlite":
        url = make_database("opscd_claims", backend)[1]
    else:
        url = f"sqlite:///{tmp_path / 'claims.db'}"
    env = {"PATH": os.environ["PATH"], "CICD_DATABASE_URL": url}
    done = subprocess.run([sys.executable, "-c", CLAIM_RACE], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["claims"] == ["claimed"] * 3 + ["full"] * 3
    assert result["again"] in ("full", "gone")  # never a fourth slot
