"""Commit statuses back to GitLab, tried from outside: webhook, gunicorn, real workers and the
Procfile's reporter, against a stand-in GitLab API that enforces GitLab's rules
(:mod:`support.gitlab_api`): a repeated state or a concurrent update of one
commit is refused there as GitLab refuses it, so posting one fails these tests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest
import requests
from conftest import (
    ROOT,
    change,
    start_reporter,
    task_log,
    wait_for_task,
    wait_ready,
    worker_args,
)
from support.gitlab import forge_project_id, register_project
from support.processes import Process, wait_until
from support.services import PrivateRedis
from test_trust import deliver, new_repo, push_payload

from cicd.forges import StatusRefused, gitlab

BUILD, PUBLISH = "opscd/build", "opscd/publish"
ECHO = "build:\n  script: [echo built]\n"


def reporting_project(web, git_server, gitlab_api, **fields):
    """A repository registered with the stand-in as its API and a token of its own."""
    repo = new_repo(git_server, group="status")
    token = "glpat-" + uuid.uuid4().hex
    gitlab_api.add_project(repo.project_path, token, forge_project_id(repo.project_path))
    secret = register_project(web, repo.project_path, repo.clone_url, api_url=gitlab_api.url,
                              api_token=token, **fields)  # fmt: skip
    return repo, secret


def states_become(gitlab_api, repo, sha, name, expected, timeout=30):
    wait_until(lambda: gitlab_api.states(repo.project_path, sha, name) == expected, timeout,
               f"{name} of {sha[:8]} to be {expected} "
               f"(is {gitlab_api.states(repo.project_path, sha, name)})")  # fmt: skip


def refusals_for(gitlab_api, sha):
    """What the stand-in refused for this commit, but for the 500s a test asked for."""
    return [r for r in gitlab_api.refused if sha in r[2] and r[0] != 500]


def test_the_stand_in_refuses_what_gitlab_refuses(gitlab_api):
    """The rules the other tests rely on: a repeat is GitLab's 400, a wrong token 401."""
    token = "glpat-" + uuid.uuid4().hex
    gitlab_api.add_project("rules/app", token)
    sha = "a" * 40
    status = {"ref": "main", "name": BUILD, "description": "", "target_url": None,
              "timeout": 5}  # fmt: skip
    gitlab.post_status(gitlab_api.url, token, "rules/app", sha, state="pending", **status)
    with pytest.raises(StatusRefused, match="Cannot transition status via :enqueue from :pending"):
        gitlab.post_status(gitlab_api.url, token, "rules/app", sha, state="pending", **status)
    gitlab.post_status(gitlab_api.url, token, "rules/app", sha, state="running", **status)
    with pytest.raises(StatusRefused, match="via :run from :running"):
        gitlab.post_status(gitlab_api.url, token, "rules/app", sha, state="running", **status)
    with pytest.raises(gitlab.StatusError, match="401") as wrong:
        gitlab.post_status(gitlab_api.url, "wrong", "rules/app", sha, state="success", **status)
    assert not wrong.value.retry
    gitlab_api.fail_next(1)
    with pytest.raises(gitlab.StatusError, match="500") as failed:
        gitlab.post_status(gitlab_api.url, token, "rules/app", sha, state="success", **status)
    assert failed.value.retry
    gitlab.post_status(gitlab_api.url, token, "rules/app", sha, state="success", **status)
    assert gitlab_api.states("rules/app", sha, BUILD) == ["pending", "running", "success"]


def test_a_push_shows_pending_running_success_on_its_commit(web, git_server, gitlab_api,
                                                            reporter):  # fmt: skip
    repo, secret = reporting_project(web, git_server, gitlab_api)
    payload = push_payload(repo, {"ci.yaml": "build:\n  script: [sleep 1, echo built]\n"})
    sha = payload["checkout_sha"]
    answer = deliver(web, payload, secret)
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["task_id"]
    # pending is recorded with the task, before the webhook answered
    first = requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()["commit_statuses"]
    assert first[0]["name"] == BUILD and first[0]["state"] == "pending"
    assert wait_for_task(web, task_id)["state"] == "success"
    states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "success"])
    status = gitlab_api.last(repo.project_path, sha, BUILD)
    assert status.ref == "main" and status.target_url == f"{web}/tasks/{task_id}"
    assert gitlab_api.last(repo.project_path, sha, PUBLISH) is None  # nothing to publish
    assert refusals_for(gitlab_api, sha) == []
    task = requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()
    assert [(s["state"], s["delivery"]) for s in task["commit_statuses"]] == [
        ("pending", "posted"), ("running", "posted"), ("success", "posted")]  # fmt: skip
    page = requests.get(f"{web}/tasks/{task_id}", timeout=10).text
    assert "opscd/build" in page and "posted" in page


def test_a_failing_build_is_failed_and_server_errors_are_tried_again(
    web, git_server, gitlab_api, reporter
):
    repo, secret = reporting_project(web, git_server, gitlab_api)
    gitlab_api.fail_next(3)  # the first status meets three 500s, then GitLab is back
    payload = push_payload(repo, {"ci.yaml": "build:\n  script: [echo no, exit 3]\n"})
    sha = payload["checkout_sha"]
    task_id = deliver(web, payload, secret).json()["task_id"]
    assert wait_for_task(web, task_id)["state"] == "failed"
    states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "failed"], timeout=40)
    assert "exit code 3" in gitlab_api.last(repo.project_path, sha, BUILD).description
    task = requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()
    assert task["commit_statuses"][0]["tries"] == 4
    assert "500" in task["commit_statuses"][0]["last_error"]


def test_a_canceled_build_is_canceled_on_its_commit(web, git_server, gitlab_api, reporter):
    repo, secret = reporting_project(web, git_server, gitlab_api)
    payload = push_payload(repo, {"ci.yaml": "build:\n  script: [sleep 60]\n"})
    sha = payload["checkout_sha"]
    task_id = deliver(web, payload, secret).json()["task_id"]
    states_become(gitlab_api, repo, sha, BUILD, ["pending", "running"])
    assert change("post", f"{web}/api/tasks/{task_id}/cancel", timeout=10).status_code == 200
    states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "canceled"])


def test_a_build_waiting_for_approval_shows_publish_pending(web, git_server, gitlab_api,
                                                          reporter):  # fmt: skip
    repo, secret = reporting_project(web, git_server, gitlab_api, approval="main")
    ci = ECHO + "publish:\n  approval: true\n"
    payload = push_payload(repo, {"ci.yaml": ci, "Dockerfile": "FROM x\n"})
    sha = payload["checkout_sha"]
    task_id = deliver(web, payload, secret).json()["task_id"]
    states_become(gitlab_api, repo, sha, PUBLISH, ["pending"])
    states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "success"])
    assert gitlab_api.last(repo.project_path, sha, PUBLISH).description == "waiting for approval"
    assert change("post", f"{web}/api/tasks/{task_id}/reject", timeout=10).status_code == 200
    states_become(gitlab_api, repo, sha, PUBLISH, ["pending", "canceled"])
    assert refusals_for(gitlab_api, sha) == []


def test_a_wrong_token_is_shown_on_the_build_and_changes_nothing(web, git_server, gitlab_api,
                                                                 reporter):  # fmt: skip
    repo = new_repo(git_server, group="status")
    gitlab_api.add_project(repo.project_path, "glpat-right", forge_project_id(repo.project_path))
    secret = register_project(web, repo.project_path, repo.clone_url, api_url=gitlab_api.url,
                              api_token="glpat-wrong")  # fmt: skip
    task_id = deliver(web, push_payload(repo, {"ci.yaml": ECHO}), secret).json()["task_id"]
    assert wait_for_task(web, task_id)["state"] == "success"

    def delivered() -> list | None:
        rows = requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()["commit_statuses"]
        return rows if rows and all(r["delivery"] != "queued" for r in rows) else None

    rows = wait_until(delivered, 30, "the statuses to be tried")
    assert {r["delivery"] for r in rows} == {"error"}
    assert "401" in rows[0]["last_error"] and "glpat" not in rows[0]["last_error"]


def test_cicd_projects_add_reads_the_api_token_from_stdin(web, git_server, opscd_env):
    repo = new_repo(git_server, group="status")
    env = {**opscd_env, "CICD_API_URL": web}
    added = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "projects", "add", repo.project_path, "--clone-url",
         repo.clone_url, "--api-url", "https://gitlab.example.com", "--api-token-stdin"],
        input="glpat-from-stdin\n", env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    shown = requests.get(f"{web}/api/projects/{repo.project_path}", timeout=10).json()
    assert shown["reports_statuses"] and shown["api_url"] == "https://gitlab.example.com"
    assert "glpat-from-stdin" not in str(shown)
    dropped = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "projects", "set", repo.project_path, "--no-statuses"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert dropped.returncode == 0, dropped.stderr
    shown = requests.get(f"{web}/api/projects/{repo.project_path}", timeout=10).json()
    assert not shown["reports_statuses"]


def test_a_worker_killed_mid_build_still_ends_with_one_final_status(
    start_stack, git_server, gitlab_api, tmp_path
):
    """The node dies with the build running; another node runs it again: the commit shows
    pending, running, success, and GitLab was never sent a state it would refuse."""
    stack = start_stack("statuses-kill", CICD_AGENT_OFFLINE_AFTER="4", CICD_REAPER_INTERVAL="1")
    reporter = start_reporter(stack.env, stack.web, tmp_path)
    rescuer = None
    try:
        repo, secret = reporting_project(stack.web, git_server, gitlab_api)
        ci = "build:\n  script: [sleep 5, echo done]\n"
        payload = push_payload(repo, {"ci.yaml": ci})
        sha = payload["checkout_sha"]
        task_id = deliver(stack.web, payload, secret).json()["task_id"]
        states_become(gitlab_api, repo, sha, BUILD, ["pending", "running"])
        stack.worker.stop(signal.SIGKILL)  # the node and its pool die mid-build
        rescuer = Process("status-rescuer", worker_args("status-rescuer"), stack.env, tmp_path)
        wait_ready(rescuer)
        done = wait_for_task(stack.web, task_id, timeout=90)
        assert done["state"] == "success", task_log(stack.web, task_id)
        states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "success"])
        assert refusals_for(gitlab_api, sha) == []
    finally:
        for node in (rescuer, reporter):
            if node is not None:
                node.stop()


def test_undelivered_statuses_outlive_a_reporter_kill_and_a_broker_restart(
    start_stack, git_server, gitlab_api, tmp_path
):
    """GitLab is down while a build runs; the reporter is killed and the broker restarted
    with its statuses still undelivered: once both are back and GitLab answers, the commit
    shows every state, in order, and GitLab was never sent one it would refuse."""
    broker = PrivateRedis(tmp_path / "redis", persistent=True).start()
    reporter = None
    try:
        stack = start_stack("statuses-outage", CICD_BROKER_URL=broker.url)
        (tmp_path / "first").mkdir()
        (tmp_path / "second").mkdir()
        reporter = start_reporter(stack.env, stack.web, tmp_path / "first")
        repo, secret = reporting_project(stack.web, git_server, gitlab_api)
        gitlab_api.fail_next(10_000)  # GitLab answers 500 until it recovers
        payload = push_payload(repo, {"ci.yaml": ECHO})
        sha = payload["checkout_sha"]
        task_id = deliver(stack.web, payload, secret).json()["task_id"]
        assert wait_for_task(stack.web, task_id)["state"] == "success"

        def retrying() -> bool:
            rows = requests.get(f"{stack.web}/api/tasks/{task_id}", timeout=10).json()
            return rows["commit_statuses"][0]["delivery"] == "retrying"

        wait_until(retrying, 30, "the first status to be tried and refused")
        reporter.stop(signal.SIGKILL)
        broker.stop()
        broker.start()
        gitlab_api.recover()
        reporter = start_reporter(stack.env, stack.web, tmp_path / "second")
        # A status claimed when the reporter died waits out its lease (60 s) first.
        states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "success"], 120)
        assert refusals_for(gitlab_api, sha) == []
        rows = requests.get(f"{stack.web}/api/tasks/{task_id}", timeout=10).json()
        assert [r["delivery"] for r in rows["commit_statuses"]] == ["posted"] * 3
    finally:
        if reporter is not None:
            reporter.stop()
        broker.stop()


MATRIX_CI = """\
matrix:
  VERSION: ["1.0", "2.0"]
steps:
  - name: test
    commands: ['echo "testing $VERSION"', '[ "$VERSION" = "1.0" ]']
  - name: package
    commands: ['echo "packaged $VERSION"']
"""


def test_each_matrix_combination_runs_on_its_own_with_its_own_status(
    web, git_server, gitlab_api, reporter
):
    repo, secret = reporting_project(web, git_server, gitlab_api)
    payload = push_payload(repo, {"ci.yaml": MATRIX_CI})
    sha = payload["checkout_sha"]
    task_id = deliver(web, payload, secret).json()["task_id"]
    done = wait_for_task(web, task_id)
    log = task_log(web, task_id)
    assert done["state"] == "failed" and done["exit_code"] == 1, log
    steps = {s["name"]: s for s in requests.get(f"{web}/api/tasks/{task_id}",
                                               timeout=10).json()["steps"]}  # fmt: skip
    assert steps["test [VERSION=1.0]"]["state"] == "success"
    assert steps["package [VERSION=1.0]"]["state"] == "success"  # the other one failed
    assert steps["test [VERSION=2.0]"]["state"] == "failed"
    assert steps["package [VERSION=2.0]"]["state"] == "skipped"
    assert "packaged 1.0" in log and "packaged 2.0" not in log
    recorded = requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()["commit_statuses"]
    assert {"opscd/build [VERSION=1.0]", "opscd/build [VERSION=2.0]"} <= {
        r["name"] for r in recorded
    }, recorded
    # (GitLab enqueues a new status it is told is running: pending first)
    states_become(gitlab_api, repo, sha, "opscd/build [VERSION=1.0]",
                  ["pending", "running", "success"])  # fmt: skip
    states_become(gitlab_api, repo, sha, "opscd/build [VERSION=2.0]",
                  ["pending", "running", "failed"])  # fmt: skip
    states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "failed"])
    assert refusals_for(gitlab_api, sha) == []
