"""An agent whose clock is behind is not dead: heartbeats are stamped and aged by the database.

The agent runs as the Procfile starts it, with its wall clock 30 s behind (a
shim loaded with LD_PRELOAD shifts CLOCK_REALTIME only; tests/support/skew.c).
With ``CICD_AGENT_OFFLINE_AFTER=6``, a heartbeat stamped with that clock would look 30 s
old to every other node, whose reaper would run the agent's build a second time.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import requests
from conftest import GitRepo, gitlab_payload, post_gitlab, procfile_worker, task_log, wait_ready
from support.processes import wait_until

SHIM = Path(__file__).parent / "support" / "skew.c"


def test_an_agent_30_s_behind_stays_online_and_its_build_runs_once(
    isolated_env, start_web, git_server, tmp_path
):
    library = tmp_path / "skew.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(SHIM), "-ldl"],
                   check=True)  # fmt: skip
    env = isolated_env("skew", CICD_AGENT_OFFLINE_AFTER="6")
    web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
    tag = uuid.uuid4().hex[:4]
    repo = GitRepo.create(git_server.root, f"skew/app-{tag}")
    repo.clone_url = git_server.repo_url(repo.project_path)
    behind = procfile_worker(f"behind-{tag}", env, tmp_path, LD_PRELOAD=str(library),
                             SKEW_SECONDS="-30")  # fmt: skip
    nodes = [behind]
    try:
        wait_ready(behind)
        ci = "build:\n  script: sleep 16; echo $((6 * 7)) slept\n"
        sha = repo.commit({"ci.yaml": ci}, message="skew")
        answer = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]

        def task() -> dict:
            return requests.get(f"{web}/api/tasks/{task_id}", timeout=5).json()

        wait_until(lambda: task()["state"] == "running", 30, "the build to start")
        # A node on time joins; its reaper sweeps once its own heartbeats are 6 s old.
        on_time = procfile_worker(f"ontime-{tag}", env, tmp_path)
        nodes.append(on_time)
        wait_ready(on_time)
        online: set[bool] = set()

        def finished() -> dict | None:
            for row in requests.get(f"{web}/api/agents", timeout=5).json()["agents"]:
                if row["hostname"].startswith(f"behind-{tag}@"):
                    online.add(row["online"])
            current = task()
            return current if current["state"] in ("success", "failed", "canceled") else None

        done = wait_until(finished, 90, "the build to finish", interval=0.5)
        assert behind.popen.poll() is None and on_time.popen.poll() is None
    finally:
        for node in nodes:
            node.stop()
    log = task_log(web, task_id)
    assert done["state"] == "success", log
    assert done["attempt"] == 1 and done["worker"].startswith(f"behind-{tag}@"), done
    assert online == {True}, "the agent behind was shown offline"
    assert log.count("42 slept") == 1 and "superseded" not in log, log
