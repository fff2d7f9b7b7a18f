"""End to end: GitLab push webhook → MariaDB rows → celery workers → clone, build, publish.

Real gunicorn, real celery workers (two nodes), real git over HTTP with Basic
auth, real MariaDB and Redis. Payloads are GitLab's, with URLs and commit ids
pointed at the repository the test pushes to.
"""

from __future__ import annotations

import pymysql
import pytest
import requests
from conftest import (
    GIT_PASSWORD,
    gitlab_payload,
    mysql_admin,
    post_gitlab,
    task_log,
    wait_for_task,
)

pytestmark = pytest.mark.usefixtures("workers")

CI_OK = """\
build:
  language: shell
  image: busybox
  workdir: /src
  script:
    - echo "building $CI_COMMIT_REF_NAME at $CI_COMMIT_SHA"
    - cat hello.txt
    - echo "GREETING=$GREETING"
  env:
    GREETING: bonjour
"""


def push(web: str, repo, files: dict[str, str], branch: str = "main", **kwargs) -> tuple:  # noqa: ANN001
    """Commit ``files`` on ``branch``, send GitLab's push hook; return (response, sha)."""
    before = repo.head(branch) if branch in _branches(repo) else "0" * 40
    sha = repo.commit(files, message=f"change on {branch}", branch=branch)
    payload = gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha, before)
    return post_gitlab(web, payload, **kwargs), sha


def _branches(repo) -> set[str]:  # noqa: ANN001
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(repo.bare_path), "for-each-ref", "--format=%(refname:short)", "refs/heads"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return set(out.split())


def test_push_builds_and_succeeds_with_log(web, repo, git_server, database_url):
    response, sha = push(web, repo, {"ci.yaml": CI_OK, "hello.txt": "hello from the repo\n"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["url"].endswith(f"/api/tasks/{body['task_id']}")

    task = wait_for_task(web, body["task_id"])
    assert task["state"] == "success", task
    assert task["commit_sha"] == sha
    assert task["branch"] == "main" and task["ref"] == "refs/heads/main"
    assert task["exit_code"] == 0
    assert task["worker"].startswith(("node1@", "node2@"))
    assert [s["state"] for s in task["stages"]] == ["success", "success", "skipped"]

    log = task_log(web, body["task_id"])
    assert f"building main at {sha}" in log
    assert "hello from the repo" in log
    assert "GREETING=bonjour" in log
    assert "Publish skipped" in log
    assert GIT_PASSWORD not in log
    # The workspace is gone once the build ends.
    rows = mysql_admin(
        f"SELECT content FROM task_logs WHERE task_id = {int(body['task_id'])}",
        database=database_url.rsplit("/", 1)[1].split("?")[0],
    )
    assert rows


__all__ = ["pymysql", "requests"]
