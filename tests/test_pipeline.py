"""End to end: GitLab push webhook → MariaDB rows → celery workers → clone, build, publish.

Real gunicorn, two real celery worker nodes, real git over HTTP with Basic
auth, real MariaDB and Redis. Payloads are GitLab's recorded ones, with URLs
and commit ids pointed at the repository the test pushes to.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import requests
from conftest import (
    GIT_PASSWORD,
    GIT_USER,
    GitHttpServer,
    GitRepo,
    free_port,
    gitlab_payload,
    post_gitlab,
    project_of,
    register_project,
    task_log,
    wait_for_task,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("workers")

ZERO = "0" * 40
CI_OK = """\
build:
  language: shell
  image: busybox
  workdir: /src
  script:
    - echo "building $CI_COMMIT_REF_NAME at $CI_COMMIT_SHA"
    - cat hello.txt
    - echo "GREETING=$GREETING"
    - test -z "$CICD_GIT_PASSWORD" && echo "no worker credentials in the build"
  env:
    GREETING: bonjour
"""
CI_ORIGINAL = """\
build:
  language: java
  image: maven:3.3-jdk-8
  workdir: /usr/src/mymaven
  script: echo mvn package -Dmaven.test.skip=true
"""


def push(web: str, repo: GitRepo, files: dict[str, str], branch: str = "main", **kwargs):
    """Commit ``files`` on ``branch`` and send GitLab's push hook; return (response, sha)."""
    sha = repo.commit(files, message=f"change on {branch}", branch=branch)
    payload = gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha)
    return post_gitlab(web, payload, **kwargs), sha


def build(web: str, repo: GitRepo, files: dict[str, str], branch: str = "main") -> dict:
    """Push and wait for the build to finish; return the task as the API shows it."""
    response, _ = push(web, repo, files, branch)
    assert response.status_code == 202, response.text
    return wait_for_task(web, response.json()["task_id"])


def workspaces(opscd_env: dict[str, str]) -> list[str]:
    return os.listdir(opscd_env["CICD_WORKSPACE_DIR"])


# --- builds that run ------------------------------------------------------------------------


def test_push_builds_and_succeeds_with_log(web, repo, opscd_env):
    response, sha = push(web, repo, {"ci.yaml": CI_OK, "hello.txt": "hello from the repo\n"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "queued"
    assert body["url"].endswith(f"/api/tasks/{body['task_id']}")

    task = wait_for_task(web, body["task_id"])
    assert task["state"] == "success", task
    assert task["commit_sha"] == sha
    assert task["branch"] == "main" and task["ref"] == "refs/heads/main"
    assert task["project"] == repo.project_path
    assert task["exit_code"] == 0 and task["error"] is None
    assert task["worker"].split("@")[0] in ("node1", "node2")
    assert task["started_at"] and task["finished_at"] and task["enqueued_at"]
    assert [(s["stage"], s["state"]) for s in task["stages"]] == [
        ("clone", "success"),
        ("build", "success"),
        ("publish", "skipped"),
    ]
    log = task_log(web, body["task_id"])
    assert f"building main at {sha}" in log
    assert "hello from the repo" in log
    assert "GREETING=bonjour" in log
    assert "no worker credentials in the build" in log
    assert "Publish skipped" in log
    assert GIT_PASSWORD not in log
    assert not [w for w in workspaces(opscd_env) if w.startswith(f"task-{body['task_id']}-")]


def test_original_ci_yaml_format_builds(web, repo):
    task = build(web, repo, {"ci.yaml": CI_ORIGINAL})
    assert task["state"] == "success", task
    assert "mvn package -Dmaven.test.skip=true" in task_log(web, task["task_id"])


def test_failing_script_fails_with_exit_code_and_log(web, repo, opscd_env):
    ci = "build:\n  script:\n    - echo before the failure\n    - exit 3\n    - echo never\n"
    task = build(web, repo, {"ci.yaml": ci})
    assert task["state"] == "failed"
    assert task["exit_code"] == 3
    assert task["stage"] == "build"
    assert "exited with code 3" in task["error"]
    assert [s["state"] for s in task["stages"]] == ["success", "failed", None]
    log = task_log(web, task["task_id"])
    assert "before the failure" in log
    assert "never" not in log.replace("$ echo never", "")
    assert "ERROR: build failed" in log
    assert not [w for w in workspaces(opscd_env) if w.startswith(f"task-{task['task_id']}-")]


def test_timeout_kills_the_whole_process_group(web, repo):
    ci = (
        "build:\n  timeout: 2s\n  script:\n"
        "    - sleep 300 &\n    - echo child=$!\n    - sleep 300\n"
    )
    task = build(web, repo, {"ci.yaml": ci})
    assert task["state"] == "failed"
    assert "timed out after 2s" in task["error"]
    assert task["exit_code"] in (128 + 15, 128 + 9)
    log = task_log(web, task["task_id"])
    child = int(re.search(r"child=(\d+)", log).group(1))
    # The background child was in the build's process group: killed too.
    wait_until(lambda: not Path(f"/proc/{child}").exists(), 10, "the background child to die")


def test_branch_with_slashes_keeps_its_full_name(web, repo):
    repo.commit({"README": "x"})
    task = build(web, repo, {"ci.yaml": CI_OK, "hello.txt": "hi\n"}, branch="feature/login")
    assert task["state"] == "success", task
    assert task["branch"] == "feature/login"
    assert task["ref"] == "refs/heads/feature/login"
    assert "building feature/login at" in task_log(web, task["task_id"])
    listed = requests.get(
        f"{web}/api/tasks", params={"project": repo.project_path, "branch": "feature/login"}
    ).json()["tasks"]
    assert [t["task_id"] for t in listed] == [task["task_id"]]


def test_tag_push_builds_the_tagged_commit(web, repo):
    sha = repo.commit({"ci.yaml": "build:\n  script: echo tag=$CI_COMMIT_TAG\n"})
    repo.commit({"later.txt": "not tagged"})
    repo.tag("release/v1.0.0", sha)
    payload = gitlab_payload("tag-event.json", repo, "refs/tags/release/v1.0.0", sha)
    response = post_gitlab(web, payload, event="Tag Push Hook")
    assert response.status_code == 202, response.text
    task = wait_for_task(web, response.json()["task_id"])
    assert task["state"] == "success", task
    assert (task["ref_type"], task["tag"], task["branch"]) == ("tag", "release/v1.0.0", None)
    assert task["commit_sha"] == sha
    assert "tag=release/v1.0.0" in task_log(web, task["task_id"])


def test_system_hook_push_builds(web, repo):
    sha = repo.commit({"ci.yaml": "build:\n  script: echo via system hook\n"})
    payload = gitlab_payload("system-push-event.json", repo, "refs/heads/main", sha)
    response = post_gitlab(web, payload, event="System Hook")
    assert response.status_code == 202, response.text
    assert wait_for_task(web, response.json()["task_id"])["state"] == "success"


def test_exact_commit_is_built_not_the_branch_head(web, repo):
    first = repo.commit({"ci.yaml": "build:\n  script: echo version one\n"})
    repo.commit({"ci.yaml": "build:\n  script: echo version two\n"})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", first)
    response = post_gitlab(web, payload)
    task = wait_for_task(web, response.json()["task_id"])
    assert task["state"] == "success" and task["commit_sha"] == first
    log = task_log(web, task["task_id"])
    assert "version one" in log and "version two" not in log


def test_exact_commit_from_a_server_that_refuses_fetch_by_id(web, tmp_path):
    with GitHttpServer(tmp_path, GIT_USER, GIT_PASSWORD) as old_server:
        old_server.protocol_v2 = False
        repo = GitRepo.create(old_server.root, "group/old-forge")
        repo.clone_url = old_server.repo_url("group/old-forge")
        first = repo.commit({"ci.yaml": "build:\n  script: echo version one\n"})
        repo.commit({"ci.yaml": "build:\n  script: echo version two\n"})
        payload = gitlab_payload("push-event.json", repo, "refs/heads/main", first)
        task = wait_for_task(web, post_gitlab(web, payload).json()["task_id"])
    assert task["state"] == "success", task
    log = task_log(web, task["task_id"])
    assert "refs/heads/main has moved on" in log
    assert "version one" in log and "version two" not in log


def test_stages_stay_on_the_node_that_cloned(web, git_server, workers):
    repos = [
        GitRepo.create(git_server.root, f"fleet/app-{i}-{uuid.uuid4().hex[:6]}") for i in range(8)
    ]
    ids = []
    for item in repos:
        item.clone_url = git_server.repo_url(item.project_path)
        response, _ = push(web, item, {"ci.yaml": "build:\n  script: sleep 1.5\n"})
        assert response.status_code == 202
        ids.append(response.json()["task_id"])
    tasks = [wait_for_task(web, task_id, timeout=120) for task_id in ids]
    nodes = set()
    for task in tasks:
        assert task["state"] == "success", task
        stage_workers = {s["worker"] for s in task["stages"]}
        assert len(stage_workers) == 1, task["stages"]
        nodes |= stage_workers
    # Eight builds of 1.5 s on nodes of 3 slots: both nodes took some.
    assert {n.split("@")[0] for n in nodes} == {"node1", "node2"}


# --- builds that fail before the script -----------------------------------------------------


def test_invalid_ci_yaml_fails_with_line_and_field(web, repo):
    task = build(web, repo, {"ci.yaml": "build:\n  script: make\n  timeout: soon\n"})
    assert task["state"] == "failed"
    assert task["stage"] == "build"
    assert task["exit_code"] is None
    assert "line 3" in task["error"] and "build.timeout" in task["error"]
    assert "build.timeout" in task_log(web, task["task_id"])


def test_missing_ci_yaml_fails_clearly(web, repo):
    task = build(web, repo, {"README.md": "no pipeline here"})
    assert task["state"] == "failed"
    assert "ci.yaml" in task["error"]


def test_publish_with_an_unreachable_engine_fails_clearly(web, repo, opscd_env):
    task = build(web, repo, {"ci.yaml": "build:\n  script: 'true'\npublish: true\n"})
    assert task["state"] == "failed" and task["stage"] == "publish"
    engine = opscd_env["CICD_DOCKER_HOST"]
    assert f"cannot reach the container engine at {engine}" in task["error"]
    assert "CICD_DOCKER_HOST" in task["error"]  # the hint


def test_clone_of_missing_repository_fails_with_hint(web, repo, git_server):
    sha = repo.commit({"ci.yaml": CI_OK})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    payload["project"]["git_http_url"] = git_server.repo_url("group/does-not-exist")
    task = wait_for_task(web, post_gitlab(web, payload).json()["task_id"])
    assert task["state"] == "failed" and task["stage"] == "clone"
    assert task["error"].startswith("git fetch:")


def test_wrong_git_credentials_fail_without_leaking_them(web, tmp_path):
    with GitHttpServer(tmp_path, GIT_USER, "another-password") as other:
        repo = GitRepo.create(other.root, "group/private")
        repo.clone_url = other.repo_url("group/private")
        sha = repo.commit({"ci.yaml": CI_OK})
        payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
        task = wait_for_task(web, post_gitlab(web, payload).json()["task_id"])
        assert other.auth_failures > 0
    assert task["state"] == "failed" and task["stage"] == "clone"
    assert "CICD_GIT_USERNAME" in task["error"]
    log = task_log(web, task["task_id"])
    for text in (task["error"], log, str(task)):
        assert GIT_PASSWORD not in text
        assert "Basic " not in text


# --- what the webhook refuses or ignores ----------------------------------------------------


def count_tasks(web: str) -> int:
    return len(requests.get(f"{web}/api/tasks", params={"limit": 500}).json()["tasks"])


def test_wrong_or_missing_token_is_refused_and_nothing_recorded(web, repo, git_server):
    sha = repo.commit({"ci.yaml": CI_OK})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    secret = register_project(web, *project_of(payload))
    other = GitRepo.create(git_server.root, f"group/other-{uuid.uuid4().hex[:8]}")
    others = register_project(web, other.project_path, git_server.repo_url(other.project_path))
    before = count_tasks(web)
    for token in ("wrong", secret[:-1], "", None, others):
        response = post_gitlab(web, payload, token=token)
        assert response.status_code == 401, token
        assert "X-Gitlab-Token" in response.json()["error"]
    assert count_tasks(web) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"object_kind": "push"}', "'ref'"),
    ],
)
def test_malformed_body_is_400_with_the_reason(web, body, message):
    response = post_gitlab(web, body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_missing_fields_are_named(web, repo):
    sha = repo.commit({"ci.yaml": CI_OK})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    del payload["project"]["path_with_namespace"]
    response = post_gitlab(web, payload)
    assert response.status_code == 400
    assert "project.path_with_namespace" in response.json()["error"]
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", "not-a-sha")
    response = post_gitlab(web, payload)
    assert response.status_code == 400 and "checkout_sha" in response.json()["error"]


@pytest.mark.parametrize(
    ("fixture", "event", "ref"),
    [
        ("push-event.json", "Push Hook", "refs/heads/feature/gone"),
        ("tag-event.json", "Tag Push Hook", "refs/tags/v0.9"),
    ],
)
def test_deletion_is_ignored_with_reason(web, repo, fixture, event, ref):
    payload = gitlab_payload(fixture, repo, ref, ZERO, before="a" * 40)
    payload["commits"], payload["total_commits_count"] = [], 0
    before = count_tasks(web)
    response = post_gitlab(web, payload, event=event)
    assert response.status_code == 200
    assert "deleted" in response.json()["ignored"]
    assert count_tasks(web) == before


def test_other_events_are_ignored_with_reason(web):
    body = (Path(__file__).parent / "fixtures/gitlab/issue-event.json").read_bytes()
    response = post_gitlab(web, body, event="Issue Hook")
    assert response.status_code == 200
    assert "Issue Hook" in response.json()["ignored"]


def test_redelivery_returns_the_first_task(web, repo):
    sha = repo.commit({"ci.yaml": "build:\n  script: echo once\n"})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    delivery = str(uuid.uuid4())
    first = post_gitlab(web, payload, delivery=delivery)
    assert first.status_code == 202
    task_id = first.json()["task_id"]
    again = post_gitlab(web, payload, delivery=delivery)
    assert again.status_code == 200
    assert again.json()["task_id"] == task_id and again.json()["duplicate"] is True
    # Idempotency-Key works the same for clients other than GitLab.
    key = str(uuid.uuid4())
    headers = {"Idempotency-Key": key}
    one = post_gitlab(web, payload, delivery="", **headers)
    two = post_gitlab(web, payload, delivery="", **headers)
    assert one.status_code == 202 and two.status_code == 200
    assert one.json()["task_id"] == two.json()["task_id"] != task_id
    assert wait_for_task(web, task_id)["state"] == "success"
    tasks = requests.get(f"{web}/api/tasks", params={"project": repo.project_path}).json()
    assert len(tasks["tasks"]) == 2


def test_broker_down_answers_503_and_redelivery_runs_the_same_task(web, start_web, repo):
    dead_broker = start_web(CICD_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    sha = repo.commit({"ci.yaml": "build:\n  script: echo after the outage\n"})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    delivery = str(uuid.uuid4())
    response = post_gitlab(dead_broker, payload, delivery=delivery)
    assert response.status_code == 503
    task_id = response.json()["task_id"]
    task = requests.get(f"{web}/api/tasks/{task_id}").json()
    # Recorded, but not left "queued" forever: failed, saying why, never sent.
    assert task["state"] == "failed" and task["enqueued_at"] is None
    assert "broker" in task["error"]
    # GitLab redelivers (same UUID) once the broker is back: the same task runs.
    response = post_gitlab(web, payload, delivery=delivery)
    assert response.status_code == 202 and response.json()["task_id"] == task_id
    task = wait_for_task(web, task_id)
    assert task["state"] == "success" and task["error"] is None
    assert "after the outage" in task_log(web, task_id)


# --- the API --------------------------------------------------------------------------------


def test_api_filters_and_errors(web, repo):
    ok = build(web, repo, {"ci.yaml": "build:\n  script: 'true'\n"})
    bad = build(web, repo, {"ci.yaml": "build:\n  script: 'false'\n"})
    listed = requests.get(f"{web}/api/tasks", params={"project": repo.project_path}).json()
    assert [t["task_id"] for t in listed["tasks"]] == [bad["task_id"], ok["task_id"]]
    failed = requests.get(
        f"{web}/api/tasks", params={"project": repo.project_path, "state": "failed"}
    ).json()
    assert [t["task_id"] for t in failed["tasks"]] == [bad["task_id"]]
    assert requests.get(f"{web}/api/tasks", params={"branch": "no-such-branch"}).json() == {
        "tasks": []
    }
    response = requests.get(f"{web}/api/tasks", params={"state": "bogus"})
    assert response.status_code == 400 and "queued" in response.json()["error"]
    assert requests.get(f"{web}/api/tasks/999999999").status_code == 404
    assert requests.get(f"{web}/api/tasks/999999999/log").status_code == 404
