"""The trust boundary, tried as an attacker would: with one project's webhook secret.

End to end through gunicorn, the webhook, MariaDB, Redis and real worker
nodes (shell executor), against projects registered through the API. A
webhook only says that a *registered* project changed: its registration, not
the payload, decides the clone URL, the credentials and where they go, the
secret variables a build gets and whether approval applies.
"""

from __future__ import annotations

import base64
import uuid

import pytest
import requests
from conftest import (
    GIT_PASSWORD,
    GIT_USER,
    GitRepo,
    change,
    gitlab_payload,
    post_gitlab,
    register_project,
    task_log,
    wait_for_task,
    wait_until,
)
from support.recorder import serve_recorder

pytestmark = pytest.mark.usefixtures("workers")

ECHO = "build:\n  script:\n    - echo built $CI_PROJECT_PATH\n"


def count_tasks(web: str) -> int:
    return len(requests.get(f"{web}/api/tasks", params={"limit": 500}, timeout=10).json()["tasks"])


def new_repo(git_server, group: str = "group") -> GitRepo:
    repo = GitRepo.create(git_server.root, f"{group}/app-{uuid.uuid4().hex[:8]}")
    repo.clone_url = git_server.repo_url(repo.project_path)
    return repo


def push_payload(repo: GitRepo, files: dict[str, str], branch: str = "main") -> dict:
    sha = repo.commit(files, branch=branch)
    return gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha)


def deliver(web: str, payload: dict, token: str | None) -> requests.Response:
    return post_gitlab(web, payload, token=token)


# --- [skip ci] ----------------------------------------------------------------------------------


@pytest.mark.parametrize("message", ["docs [skip ci]", "[CI SKIP] typo", "Fix\n\n[Skip CI]"])
def test_skip_ci_in_the_pushed_commit_message_builds_nothing(web, git_server, message):
    repo = new_repo(git_server)
    secret = register_project(web, repo.project_path, repo.clone_url)
    payload = push_payload(repo, {"ci.yaml": ECHO})
    payload["commits"][-1]["message"] = message
    before = count_tasks(web)
    assert deliver(web, payload, token="wrong").status_code == 401  # the secret comes first
    answer = deliver(web, payload, token=secret)
    assert answer.status_code == 200 and answer.json() == {"ignored": "skip ci"}, answer.text
    assert count_tasks(web) == before
    # Only the head commit counts, and "skip ci" without brackets is an ordinary message.
    payload["commits"][-1]["message"] = "skip ci is what [skip-ci] is not"
    answer = deliver(web, payload, token=secret)
    assert answer.status_code == 202, answer.text
    assert wait_for_task(web, answer.json()["task_id"])["state"] == "success"


# --- which project, from where, with whose token -----------------------------------------------


def test_unregistered_project_is_404_with_the_command_to_register_it(web, git_server):
    repo = new_repo(git_server)
    other = new_repo(git_server)
    others_secret = register_project(web, other.project_path, other.clone_url)
    before = count_tasks(web)
    answer = deliver(web, push_payload(repo, {"ci.yaml": ECHO}), token=others_secret)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert f"project {repo.project_path} is not registered" in error
    assert f"cicd projects add {repo.project_path} --clone-url {repo.clone_url}" in error
    assert count_tasks(web) == before


def test_another_projects_token_and_another_clone_url_are_refused(web, git_server):
    """A's payload with B's secret is 401; A's secret with B's clone URL (B's ci.yaml would
    run with A's secrets) is 400 naming A's URL; nothing is recorded, nothing cloned."""
    a, b = new_repo(git_server), new_repo(git_server)
    a_secret = register_project(web, a.project_path, a.clone_url)
    b_secret = register_project(web, b.project_path, b.clone_url)
    before = count_tasks(web)
    payload = push_payload(a, {"ci.yaml": ECHO})
    assert deliver(web, payload, token=b_secret).status_code == 401

    b.commit({"ci.yaml": "build:\n  script: ['echo $SECRET | base64']\n"})
    swapped = gitlab_payload("push-event.json", a, "refs/heads/main", payload["after"])
    swapped["project"]["git_http_url"] = b.clone_url
    answer = deliver(web, swapped, token=a_secret)
    assert answer.status_code == 400
    assert f"registered with clone URL {a.clone_url}" in answer.json()["error"]
    assert b.clone_url in answer.json()["error"]
    assert count_tasks(web) == before

    # Spelled differently, the registered URL is the same repository.
    spelled = gitlab_payload("push-event.json", a, "refs/heads/main", payload["after"])
    spelled["project"]["git_http_url"] = a.clone_url.removesuffix(".git") + "/"
    answer = deliver(web, spelled, token=a_secret)
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    assert task["state"] == "success" and task["clone_url"] == a.clone_url


def test_a_recorded_gitlab_project_id_must_match(web, git_server):
    repo = new_repo(git_server)
    secret = register_project(web, repo.project_path, repo.clone_url)
    payload = push_payload(repo, {"ci.yaml": ECHO})
    first = deliver(web, payload, token=secret)
    assert first.status_code == 202, first.text
    shown = requests.get(f"{web}/api/projects/{repo.project_path}", timeout=10).json()
    recorded = shown["forge_project_id"]
    assert recorded == payload["project_id"]  # remembered from the first webhook
    forged = push_payload(repo, {"ci.yaml": ECHO})
    forged["project_id"] = forged["project"]["id"] = recorded + 1
    answer = deliver(web, forged, token=secret)
    assert answer.status_code == 400
    assert f"GitLab project {recorded} here" in answer.json()["error"]
    wait_for_task(web, first.json()["task_id"])


def test_a_namespace_covers_its_projects_at_their_own_urls(web, git_server):
    """A GitLab group webhook: one registration of group/*, one secret; each project's clone
    URL must be the prefix plus its path."""
    group = f"ns{uuid.uuid4().hex[:6]}"
    prefix = git_server.base_url + "/"
    secret = register_project(web, f"{group}/*", prefix)
    one, two = new_repo(git_server, group), new_repo(git_server, f"{group}/sub")
    for repo in (one, two):
        answer = deliver(web, push_payload(repo, {"ci.yaml": ECHO}), token=secret)
        assert answer.status_code == 202, answer.text
        task = wait_for_task(web, answer.json()["task_id"])
        assert task["state"] == "success", task_log(web, task["task_id"])
        assert task["clone_url"] == f"{prefix}{repo.project_path}.git"
    # A project of the group whose payload names another repository's URL: refused.
    stray = push_payload(one, {"ci.yaml": ECHO})
    stray["project"]["git_http_url"] = two.clone_url
    assert deliver(web, stray, token=secret).status_code == 400
    # The namespace's secret is no other group's.
    outsider = new_repo(git_server, f"other{uuid.uuid4().hex[:6]}")
    register_project(web, outsider.project_path, outsider.clone_url)
    assert deliver(web, push_payload(outsider, {"ci.yaml": ECHO}), token=secret).status_code == 401


# --- credentials go only where the project lives ----------------------------------------------


def test_the_fleet_credential_never_goes_to_a_host_the_payload_names(web, git_server):
    listener, seen = serve_recorder()
    try:
        repo = new_repo(git_server)
        secret = register_project(web, repo.project_path, repo.clone_url)
        payload = push_payload(repo, {"ci.yaml": ECHO})
        elsewhere = f"http://127.0.0.1:{listener.server_port}/{repo.project_path}.git"
        payload["project"]["git_http_url"] = payload["repository"]["git_http_url"] = elsewhere
        answer = deliver(web, payload, token=secret)
        assert answer.status_code == 400 and repo.clone_url in answer.json()["error"]
        # The same push as GitLab sends it builds, from the registered server.
        good = deliver(web, push_payload(repo, {"ci.yaml": ECHO}), token=secret)
        assert wait_for_task(web, good.json()["task_id"])["state"] == "success"
    finally:
        listener.shutdown()
    assert seen.seen == [], "the listener the payload named was contacted"


def test_a_git_server_that_redirects_elsewhere_never_passes_the_credentials_on(web, repo):
    """git applies a first redirect to every later request: the fleet's Authorization header
    would follow it to another host. Builds follow no redirect, and say so."""
    elsewhere, listener = serve_recorder()
    redirector, first = serve_recorder(f"http://127.0.0.1:{elsewhere.server_port}")
    try:
        sha = repo.commit({"ci.yaml": "build:\n  script: echo never\n"})
        repo.clone_url = f"http://127.0.0.1:{redirector.server_port}/{repo.project_path}.git"
        answer = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
        done = wait_for_task(web, answer.json()["task_id"])
        log = task_log(web, done["task_id"])
    finally:
        redirector.shutdown()
        elsewhere.shutdown()
    assert done["state"] == "failed" and "redirect" in log, log
    assert first.seen, "the clone never reached the project's git server"
    sent_on = [headers for _, headers in listener.seen if "Authorization" in headers]
    assert sent_on == [], "the credentials went to the host the server redirected to"
    assert GIT_PASSWORD not in log


def test_a_projects_own_git_credentials_are_used_and_masked(start_stack, git_server):
    """An installation whose instance credentials are wrong: a project registered with its own
    builds; one without fails to authenticate, and says where to look."""
    stack = start_stack("own-git", CICD_GIT_PASSWORD="not-the-password")
    try:
        own, plain = new_repo(git_server), new_repo(git_server)
        own_secret = register_project(stack.web, own.project_path, own.clone_url,
                                      git_username=GIT_USER, git_password=GIT_PASSWORD)  # fmt: skip
        shown = requests.get(f"{stack.web}/api/projects/{own.project_path}", timeout=10)
        assert GIT_PASSWORD not in shown.text
        plain_secret = register_project(stack.web, plain.project_path, plain.clone_url)
        ok = deliver(stack.web, push_payload(own, {"ci.yaml": ECHO}), token=own_secret)
        bad = deliver(stack.web, push_payload(plain, {"ci.yaml": ECHO}), token=plain_secret)
        ok_task = wait_for_task(stack.web, ok.json()["task_id"])
        bad_task = wait_for_task(stack.web, bad.json()["task_id"])
    finally:
        stack.worker.stop()
    assert ok_task["state"] == "success", task_log(stack.web, ok_task["task_id"])
    assert bad_task["state"] == "failed" and bad_task["stage"] == "clone"
    assert "git credentials" in bad_task["error"]
    for task in (ok_task, bad_task):
        log = task_log(stack.web, task["task_id"])
        encoded = base64.b64encode(f"{GIT_USER}:{GIT_PASSWORD}".encode()).decode()
        assert GIT_PASSWORD not in log and encoded not in log and "not-the-password" not in log


# --- what the server decides for a ref ----------------------------------------------------------

SECRET_CI = """\
build:
  secrets: [DEPLOY_TOKEN]
  script:
    - 'echo "token length: ${#DEPLOY_TOKEN}"'
    - 'printf %s "$DEPLOY_TOKEN" | base64'
"""


def test_secrets_go_only_to_builds_of_protected_refs(web, git_server):
    repo = new_repo(git_server)
    token = "deploy-" + uuid.uuid4().hex
    secret = register_project(web, repo.project_path, repo.clone_url, protected="main,release/*")
    url = f"{web}/api/projects/{repo.project_path}/secrets/DEPLOY_TOKEN"
    assert change("put", url, json={"value": token}, timeout=10).status_code == 201
    encoded = base64.b64encode(token.encode()).decode()

    pushed = deliver(web, push_payload(repo, {"ci.yaml": SECRET_CI}, "feature/x"), token=secret)
    feature = wait_for_task(web, pushed.json()["task_id"])
    log = task_log(web, feature["task_id"])
    assert feature["state"] == "success", log
    assert "token length: 0" in log and token not in log and encoded not in log
    assert "Secret variables withheld: DEPLOY_TOKEN" in log
    assert "feature/x is not a protected ref" in log and "main,release/*" in log

    # A tag named like a protected branch is not that branch.
    sha = repo.commit({"ci.yaml": SECRET_CI})
    repo.tag("main", sha)
    tagged = gitlab_payload("tag-event.json", repo, "refs/tags/main", sha)
    answer = post_gitlab(web, tagged, event="Tag Push Hook", token=secret)
    tag_log = task_log(web, wait_for_task(web, answer.json()["task_id"])["task_id"])
    assert "token length: 0" in tag_log and "withheld" in tag_log

    for branch in ("main", "release/1"):
        pushed = deliver(web, push_payload(repo, {"ci.yaml": SECRET_CI}, branch), token=secret)
        done = wait_for_task(web, pushed.json()["task_id"])
        log = task_log(web, done["task_id"])
        assert done["state"] == "success", log
        assert f"token length: {len(token)}" in log and "withheld" not in log
        assert token not in log  # masked


def test_a_commit_the_ref_does_not_hold_is_not_built_under_its_name(web, git_server):
    """A secret holder claims that a commit of an unprotected branch is main's, to run it
    with main's secrets: the registered repository is asked, and says no."""
    repo = new_repo(git_server)
    token = "deploy-" + uuid.uuid4().hex
    secret = register_project(web, repo.project_path, repo.clone_url)
    url = f"{web}/api/projects/{repo.project_path}/secrets/DEPLOY_TOKEN"
    assert change("put", url, json={"value": token}, timeout=10).status_code == 201
    repo.commit({"ci.yaml": ECHO})  # main
    sha = repo.commit({"ci.yaml": SECRET_CI}, branch="feature/steal")
    claimed = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    answer = deliver(web, claimed, token=secret)
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    log = task_log(web, task["task_id"])
    assert task["state"] == "failed" and task["stage"] == "clone", log
    assert f"commit {sha} is not on refs/heads/main" in task["error"]
    assert "token length" not in log and token not in log
    # A tag's claim is checked the same way.
    repo.tag("v9", repo.commit({"ci.yaml": ECHO}))
    tagged = gitlab_payload("tag-event.json", repo, "refs/tags/v9", sha)
    answer = post_gitlab(web, tagged, event="Tag Push Hook", token=secret)
    task = wait_for_task(web, answer.json()["task_id"])
    assert task["state"] == "failed" and "refs/tags/v9 points at" in task["error"]


def test_the_servers_approval_rule_cannot_be_pushed_away(web, git_server):
    """The registration says main's publish waits for a person; a ci.yaml that says
    ``approval: false`` changes nothing."""
    repo = new_repo(git_server)
    secret = register_project(web, repo.project_path, repo.clone_url, approval="main")
    ci = "build:\n  script: [echo built]\npublish:\n  approval: false\n"
    answer = deliver(web, push_payload(repo, {"ci.yaml": ci, "Dockerfile": "FROM x\n"}), secret)
    task_id = answer.json()["task_id"]

    def waiting() -> dict | None:
        task = requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()
        assert task["state"] in ("queued", "running", "waiting"), task
        return task if task["state"] == "waiting" else None

    task = wait_until(waiting, 60, "the build to wait for approval")
    assert task["approval"]["required"]
    rejected = change("post", f"{web}/api/tasks/{task_id}/reject", timeout=10)
    assert rejected.status_code == 200 and rejected.json()["state"] == "canceled"
