"""GitHub and Gitea end to end: their recorded payloads, signed as each forge signs them, sent
to gunicorn's ``/webhooks/github`` and ``/webhooks/gitea``, built by real workers, and
their statuses posted by the Procfile's reporter to stand-ins that enforce each API's token
auth and state enum (:mod:`support.github_api`, :mod:`support.gitea_api`).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import subprocess
import sys
import uuid
from functools import cache

import pytest
import requests
from conftest import ROOT, change, task_log, wait_for_task
from support.gitea_api import GiteaAPI
from support.github_api import GitHubAPI
from support.gitlab import FIXTURES, forge_project_id, gitlab_headers, register_project
from support.processes import wait_until
from test_statuses import BUILD
from test_trust import SECRET_CI, count_tasks, new_repo

ECHO = "build:\n  script: [echo built $CI_PIPELINE_SOURCE]\n"


@pytest.fixture(scope="module")
def github_api():
    with GitHubAPI() as api:
        yield api


@pytest.fixture(scope="module")
def gitea_api():
    with GiteaAPI() as api:
        yield api


@cache
def _recorded(forge: str, name: str) -> dict:
    return json.loads((FIXTURES / forge / name).read_text())


def _point_at(repository: dict, repo) -> None:
    repository.update(full_name=repo.project_path, clone_url=repo.clone_url,
                      html_url=repo.clone_url.removesuffix(".git"),
                      id=forge_project_id(repo.project_path))  # fmt: skip


def push_payload(forge: str, repo, branch: str, sha: str, message: str = "change") -> dict:
    """The forge's recorded push, pointed at ``repo``'s ``branch`` at ``sha``."""
    payload = copy.deepcopy(_recorded(forge, "push.json" if forge == "github" else
                                      "push-event.json"))  # fmt: skip
    _point_at(payload["repository"], repo)
    payload.update(ref=f"refs/heads/{branch}", after=sha)
    payload["head_commit"].update(id=sha, message=message)
    for commit in payload.get("commits", []):
        commit.update(id=sha, message=message)
    return payload


def pull_payload(forge: str, target, source, branch: str, sha: str, number: int,
                 action: str = "opened") -> dict:  # fmt: skip
    """The forge's recorded pull request, from ``source``'s ``branch`` into ``target``."""
    name = "pull-request.json" if forge == "github" else "pull-request-event.json"
    payload = copy.deepcopy(_recorded(forge, name))
    _point_at(payload["repository"], target)
    payload.update(action=action, number=number)
    pull = payload["pull_request"]
    pull["number"] = number
    _point_at(pull["base"]["repo"], target)
    _point_at(pull["head"]["repo"], source)
    pull["head"].update(ref=branch, sha=sha)
    return payload


def sign(forge: str, body: bytes, secret: str | None) -> dict[str, str]:
    """The headers the forge sends with ``body``, signed with ``secret`` (None: unsigned)."""
    signature = hmac.new((secret or "").encode(), body, hashlib.sha256).hexdigest()
    if forge == "github":
        headers = {"X-GitHub-Delivery": str(uuid.uuid4())}
        if secret is not None:
            headers["X-Hub-Signature-256"] = f"sha256={signature}"
        return headers
    headers = {"X-Gitea-Delivery": str(uuid.uuid4())}
    if secret is not None:
        headers["X-Gitea-Signature"] = signature
    return headers


def post(web: str, forge: str, event: str, payload: dict, secret: str | None,
         **headers: str) -> requests.Response:  # fmt: skip
    body = json.dumps(payload).encode()
    event_header = "X-GitHub-Event" if forge == "github" else "X-Gitea-Event"
    all_headers = {"Content-Type": "application/json", event_header: event,
                   **sign(forge, body, secret), **headers}  # fmt: skip
    return requests.post(f"{web}/webhooks/{forge}", data=body, headers=all_headers, timeout=10)


def registered(web, git_server, forge: str, api, **fields):
    """A repository registered on ``forge`` with the stand-in as its API and a token."""
    repo = new_repo(git_server, group=forge)
    token = f"{forge}-" + uuid.uuid4().hex
    api.add_repository(repo.project_path, token)
    secret = register_project(web, repo.project_path, repo.clone_url, forge=forge,
                              api_url=api.url, api_token=token, **fields)  # fmt: skip
    return repo, secret


def states_become(api, repo, sha: str, expected: list[str], timeout: float = 30) -> None:
    wait_until(lambda: api.states(repo.project_path, sha, BUILD) == expected, timeout,
               f"{BUILD} of {sha[:8]} to be {expected} "
               f"(is {api.states(repo.project_path, sha, BUILD)})")  # fmt: skip


@pytest.mark.parametrize("forge", ["github", "gitea"])
def test_a_signed_push_builds_and_reports_in_the_forges_states(
    web, git_server, github_api, gitea_api, reporter, forge
):
    api = github_api if forge == "github" else gitea_api
    repo, secret = registered(web, git_server, forge, api)
    sha = repo.commit({"ci.yaml": ECHO})
    payload = push_payload(forge, repo, "main", sha)
    before = count_tasks(web)
    for wrong in (None, "not-the-secret"):  # unsigned, signed with another secret
        answer = post(web, forge, "push", payload, wrong)
        assert answer.status_code == 401, answer.text
    header = "X-Hub-Signature-256" if forge == "github" else "X-Gitea-Signature"
    assert header in answer.json()["error"]
    body = json.dumps(payload).encode()
    tampered = {**sign(forge, body, secret), "Content-Type": "application/json"}
    event = {"X-GitHub-Event" if forge == "github" else "X-Gitea-Event": "push"}
    answer = requests.post(f"{web}/webhooks/{forge}", data=body.replace(b"change", b"chang3"),
                           headers={**tampered, **event}, timeout=10)  # fmt: skip
    assert answer.status_code == 401  # the signature covers the body as sent
    # The GitLab endpoint takes a secret as it is sent: not a project's on another forge.
    answer = requests.post(f"{web}/webhooks/gitlab", data=body,
                           headers=gitlab_headers(secret), timeout=10)  # fmt: skip
    assert answer.status_code == 401 and count_tasks(web) == before

    delivery = {"X-GitHub-Delivery" if forge == "github" else "X-Gitea-Delivery": "d-" + sha}
    answer = post(web, forge, "push", payload, secret, **delivery)
    assert answer.status_code == 202, answer.text
    again = post(web, forge, "push", payload, secret, **delivery)  # the forge redelivers
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["task_id"] == answer.json()["task_id"]
    task = wait_for_task(web, answer.json()["task_id"])
    assert task["state"] == "success", task_log(web, task["task_id"])
    assert (task["forge"], task["project"], task["commit_sha"]) == (forge, repo.project_path, sha)
    # OpsCD's pending and running are both the forge's pending.
    states_become(api, repo, sha, ["pending", "pending", "success"])
    last = api.last(repo.project_path, sha, BUILD)
    assert last["target_url"] == f"{web}/tasks/{task['task_id']}"
    assert not [r for r in api.refused if sha in r[2]]

    failing = repo.commit({"ci.yaml": "build:\n  script: [exit 4]\n"})
    answer = post(web, forge, "push", push_payload(forge, repo, "main", failing), secret)
    assert wait_for_task(web, answer.json()["task_id"])["state"] == "failed"
    states_become(api, repo, failing, ["pending", "pending", "failure"])
    skipped = push_payload(forge, repo, "main", failing, message="docs [skip ci]")
    assert post(web, forge, "push", skipped, secret).json() == {"ignored": "skip ci"}


def test_a_project_on_another_forge_is_refused_by_name(web, git_server, github_api):
    repo, secret = registered(web, git_server, "github", github_api)
    sha = repo.commit({"ci.yaml": ECHO})
    answer = post(web, "gitea", "push", push_payload("gitea", repo, "main", sha), secret)
    assert answer.status_code == 400
    assert "registered as a GitHub project" in answer.json()["error"]


def test_githubs_ping_is_answered_only_when_signed(web, git_server, github_api):
    repo, secret = registered(web, git_server, "github", github_api)
    ping = copy.deepcopy(_recorded("github", "ping.json"))
    ping["repository"] = {}  # a repository webhook's ping names its repository
    _point_at(ping["repository"], repo)
    answer = post(web, "github", "ping", ping, secret)
    assert answer.status_code == 200 and answer.json() == {"ignored": "ping"}, answer.text
    assert post(web, "github", "ping", ping, "wrong").status_code == 401


@pytest.mark.parametrize("forge", ["github", "gitea"])
def test_a_pull_request_builds_its_head_and_reports_on_it(
    web, git_server, github_api, gitea_api, reporter, forge
):
    api = github_api if forge == "github" else gitea_api
    repo, secret = registered(web, git_server, forge, api)
    repo.commit({"ci.yaml": ECHO})
    sha = repo.commit({"change.txt": "x\n"}, branch="topic")
    answer = post(web, forge, "pull_request", pull_payload(forge, repo, repo, "topic", sha, 9),
                  secret)  # fmt: skip
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    assert task["merge_request_iid"] == 9 and task["ref_name"] == "topic"
    assert "built merge_request_event" in log
    states_become(api, repo, sha, ["pending", "pending", "success"])
    closed = pull_payload(forge, repo, repo, "topic", sha, 9, action="closed")
    assert post(web, forge, "pull_request", closed, secret).status_code == 200


def test_a_gitea_pull_request_from_an_unregistered_fork_gets_no_secrets(
    web, git_server, gitea_api, reporter
):
    target, secret = registered(web, git_server, "gitea", gitea_api, fork_mrs="no-secrets")
    deploy = "deploy-" + uuid.uuid4().hex
    url = f"{web}/api/projects/{target.project_path}/secrets/DEPLOY_TOKEN"
    assert change("put", url, json={"value": deploy}, timeout=10).status_code == 201
    fork = new_repo(git_server, group="giteafork")  # never registered
    sha = fork.commit({"ci.yaml": SECRET_CI}, branch="main")
    subprocess.run(["git", "-C", str(target.bare_path), "fetch", "-q", str(fork.bare_path),
                    "+refs/heads/main:refs/pull/4/head"], check=True)  # fmt: skip
    answer = post(web, "gitea", "pull_request",
                  pull_payload("gitea", target, fork, "main", sha, 4), secret)  # fmt: skip
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    assert task["fork_of"] == fork.project_path and task["clone_url"] == target.clone_url
    assert "token length: 0" in log and deploy not in log
    states_become(gitea_api, target, sha, ["pending", "pending", "success"])


def test_cicd_projects_add_registers_a_github_project(web, git_server, opscd_env):
    repo = new_repo(git_server, group="cli")
    env = {**opscd_env, "CICD_API_URL": web}
    added = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "projects", "add", repo.project_path, "--forge",
         "github", "--fork-mrs", "no-secrets", "--clone-url", repo.clone_url, "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    shown = json.loads(added.stdout)
    assert shown["webhook_url"] == f"{web}/webhooks/github" and shown["webhook_secret"]
    project = requests.get(f"{web}/api/projects/{repo.project_path}", timeout=10).json()
    assert (project["forge"], project["fork_mrs"]) == ("github", "no-secrets")
    unknown = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "projects", "add", "x/y", "--forge", "bitbucket",
         "--clone-url", repo.clone_url], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert unknown.returncode != 0 and "bitbucket" in unknown.stderr


def test_a_web_that_cannot_decrypt_the_secret_answers_503_and_records_nothing(
    web, start_web, git_server, github_api
):
    from cryptography.fernet import Fernet

    repo, secret = registered(web, git_server, "github", github_api)
    other = start_web(
        CICD_SECRETS_KEY=Fernet.generate_key().decode()
    )  # not the one it was kept with
    sha = repo.commit({"ci.yaml": ECHO})
    before = count_tasks(web)
    answer = post(other, "github", "push", push_payload("github", repo, "main", sha), secret)
    assert answer.status_code == 503, answer.text
    assert f"cannot verify deliveries of {repo.project_path}" in answer.json()["error"]
    assert count_tasks(web) == before
