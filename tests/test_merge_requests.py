"""Merge request pipelines, tried from outside: GitLab's recorded "Merge Request Hook" sent to
gunicorn, built by real workers, its statuses posted by the Procfile's reporter to a
stand-in GitLab API that enforces GitLab's rules.

A merge request is a delivery of its target project. Its commits are built as the source
project's when that one is registered, from the target repository's head ref of the
request without secrets when the fork is not registered and the target allows it, and
not at all otherwise; a payload never decides the clone URL or the secrets.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest
import requests
from conftest import change, gitlab_payload, post_gitlab, task_log, wait_for_task
from support.gitlab import forge_project_id, register_project
from test_statuses import BUILD, states_become
from test_trust import SECRET_CI, count_tasks, new_repo, push_payload

MR_CI = "build:\n  script:\n    - echo merge request !$CI_MERGE_REQUEST_IID from $CI_MERGE_REQUEST_SOURCE_PROJECT_PATH $CI_PIPELINE_SOURCE\n"  # noqa: E501


def mr_payload(target, source, branch: str, sha: str, iid: int = 1, action: str = "open",
               message: str = "add a feature") -> dict:  # fmt: skip
    """GitLab's recorded merge request event, from ``source``'s ``branch`` into ``target``."""
    payload = gitlab_payload("merge-request-event.json", target, "refs/heads/main", sha)
    for key in ("ref", "after", "checkout_sha"):
        payload.pop(key, None)
    attributes = payload["object_attributes"]
    attributes.update(iid=iid, action=action, source_branch=branch, target_branch="main",
                      source_project_id=forge_project_id(source.project_path),
                      target_project_id=forge_project_id(target.project_path))  # fmt: skip
    for side, repo in (("source", source), ("target", target)):
        attributes[side].update(path_with_namespace=repo.project_path,
                                git_http_url=repo.clone_url, http_url=repo.clone_url,
                                web_url=repo.clone_url.removesuffix(".git"))  # fmt: skip
    attributes["last_commit"].update(id=sha, message=message)
    if action == "update":
        attributes["oldrev"] = "0" * 39 + "1"
    return payload


def post_mr(web: str, payload: dict, token: str) -> requests.Response:
    return post_gitlab(web, payload, event="Merge Request Hook", token=token)


def reporting(web, git_server, gitlab_api, **fields):
    repo = new_repo(git_server, group="mr")
    token = "glpat-" + uuid.uuid4().hex
    gitlab_api.add_project(repo.project_path, token, forge_project_id(repo.project_path))
    secret = register_project(web, repo.project_path, repo.clone_url, api_url=gitlab_api.url,
                              api_token=token, **fields)  # fmt: skip
    return repo, secret


def test_the_recorded_merge_request_event_parses():
    from support.gitlab import FIXTURES

    from cicd.forges import Ignored, MergeRequestEvent, gitlab

    body = (FIXTURES / "gitlab" / "merge-request-event.json").read_bytes()
    event = gitlab.parse({"X-Gitlab-Event": "Merge Request Hook"}, body)
    assert isinstance(event, MergeRequestEvent)
    assert (event.project, event.source_project) == ("gitlabhq/gitlab-test",
                                                     "awesome_space/awesome_project")  # fmt: skip
    assert (event.number, event.action, event.source_branch) == (1, "open", "ms-viewport")
    assert event.commit_sha == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    assert event.head_ref == "refs/merge-requests/1/head"
    assert event.source_clone_url == "http://example.com/awesome_space/awesome_project.git"
    import json

    payload = json.loads(body)
    payload["object_attributes"]["action"] = "update"  # a title change: no oldrev
    ignored = gitlab.parse({"X-Gitlab-Event": "Merge Request Hook"}, json.dumps(payload).encode())
    assert isinstance(ignored, Ignored) and "without new commits" in ignored.reason
    payload["object_attributes"]["action"] = "close"
    ignored = gitlab.parse({"X-Gitlab-Event": "Merge Request Hook"}, json.dumps(payload).encode())
    assert isinstance(ignored, Ignored) and "'close'" in ignored.reason
    payload["object_attributes"]["action"] = "open"
    del payload["object_attributes"]["last_commit"]["id"]
    from cicd.errors import PayloadError

    with pytest.raises(PayloadError, match=r"last_commit\.id"):
        gitlab.parse({"X-Gitlab-Event": "Merge Request Hook"}, json.dumps(payload).encode())


def test_a_merge_request_builds_its_source_branch_and_reports_on_its_commit(
    web, git_server, gitlab_api, reporter
):
    repo, secret = reporting(web, git_server, gitlab_api)
    repo.commit({"ci.yaml": MR_CI})
    sha = repo.commit({"feature.txt": "new\n"}, branch="feature/login")
    payload = mr_payload(repo, repo, "feature/login", sha, iid=7)
    assert post_mr(web, payload, "wrong").status_code == 401
    answer = post_mr(web, payload, secret)
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    assert task["merge_request_iid"] == 7 and task["ref_name"] == "feature/login"
    assert task["commit_sha"] == sha and task["fork_of"] is None
    assert f"merge request !7 from {repo.project_path} merge_request_event" in log
    states_become(gitlab_api, repo, sha, BUILD, ["pending", "running", "success"])
    assert gitlab_api.last(repo.project_path, sha, BUILD).ref == "feature/login"
    page = requests.get(f"{web}/tasks/{task['task_id']}", timeout=10).text
    assert "!7" in page

    # New commits on the request build again; a title change does not.
    newer = repo.commit({"feature.txt": "newer\n"}, branch="feature/login")
    answer = post_mr(web, mr_payload(repo, repo, "feature/login", newer, 7, "update"), secret)
    assert answer.status_code == 202 and wait_for_task(web, answer.json()["task_id"])
    before = count_tasks(web)
    titled = mr_payload(repo, repo, "feature/login", newer, 7, "update")
    del titled["object_attributes"]["oldrev"]
    answer = post_mr(web, titled, secret)
    assert answer.status_code == 200 and "without new commits" in answer.json()["ignored"]
    skipped = mr_payload(repo, repo, "feature/login", newer, 7, message="wip [skip ci]")
    assert post_mr(web, skipped, secret).json() == {"ignored": "skip ci"}
    assert count_tasks(web) == before


def test_a_registered_forks_request_is_built_as_the_fork_and_reported_on_its_commit(
    web, git_server, gitlab_api, reporter
):
    target, target_secret = reporting(web, git_server, gitlab_api)
    fork, _ = reporting(web, git_server, gitlab_api)  # main is protected there
    deploy = "deploy-" + uuid.uuid4().hex
    url = f"{web}/api/projects/{fork.project_path}/secrets/DEPLOY_TOKEN"
    assert change("put", url, json={"value": deploy}, timeout=10).status_code == 201
    target.commit({"ci.yaml": MR_CI})
    sha = fork.commit({"ci.yaml": SECRET_CI, "fix.txt": "fix\n"}, branch="main")
    answer = post_mr(web, mr_payload(target, fork, "main", sha, iid=3), target_secret)
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    assert (task["project"], task["clone_url"]) == (fork.project_path, fork.clone_url)
    assert task["merge_request_target"] == target.project_path
    # The target's webhook secret cannot vouch for the fork: none of the fork's secrets.
    assert "token length: 0" in log and deploy not in log
    assert f"a merge request into {target.project_path}" in log
    states_become(gitlab_api, fork, sha, BUILD, ["pending", "running", "success"])
    assert gitlab_api.states(target.project_path, sha, BUILD) == []

    # The payload cannot send the fork's build to another URL.
    moved = mr_payload(target, fork, "main", sha, iid=3)
    moved["object_attributes"]["source"]["git_http_url"] = "http://127.0.0.1:9/evil/app.git"
    before = count_tasks(web)
    answer = post_mr(web, moved, target_secret)
    assert answer.status_code == 400 and "registered with clone URL" in answer.text
    assert count_tasks(web) == before


def test_an_unregistered_forks_request_is_built_without_secrets_only_if_allowed(
    web, git_server, gitlab_api, reporter
):
    target, secret = reporting(web, git_server, gitlab_api, protected="main")
    deploy = "deploy-" + uuid.uuid4().hex
    url = f"{web}/api/projects/{target.project_path}/secrets/DEPLOY_TOKEN"
    assert change("put", url, json={"value": deploy}, timeout=10).status_code == 201
    target.commit({"ci.yaml": SECRET_CI})
    fork = new_repo(git_server, group="forks")  # never registered
    # The fork names its branch like the target's protected one.
    publishing = SECRET_CI + "publish:\n  dockerfile: Dockerfile\n"
    sha = fork.commit({"ci.yaml": publishing}, branch="main")
    payload = mr_payload(target, fork, "main", sha, iid=11)

    before = count_tasks(web)
    answer = post_mr(web, payload, secret)
    assert answer.status_code == 200, answer.text
    assert "fork_mrs: off" in answer.json()["ignored"] and count_tasks(web) == before

    changed = change("patch", f"{web}/api/projects/{target.project_path}",
                     json={"fork_mrs": "no-secrets"}, timeout=10)  # fmt: skip
    assert changed.status_code == 200 and changed.json()["fork_mrs"] == "no-secrets"
    # GitLab keeps every request's head in the target repository.
    subprocess.run(["git", "-C", str(target.bare_path), "fetch", "-q", str(fork.bare_path),
                    "+refs/heads/main:refs/merge-requests/11/head"], check=True)  # fmt: skip
    answer = post_mr(web, payload, secret)
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    assert task["fork_of"] == fork.project_path and task["project"] == target.project_path
    assert task["clone_url"] == target.clone_url  # never the payload's fork URL
    assert "token length: 0" in log and deploy not in log
    assert f"a merge request from the fork {fork.project_path}" in log
    assert "Publish skipped" in log and task["image"] is None
    states_become(gitlab_api, target, sha, BUILD, ["pending", "running", "success"])


@pytest.mark.usefixtures("workers")
def test_auto_cancel_supersedes_a_requests_older_builds_not_the_branch_pushes(
    start_web, git_server
):
    web = start_web(CICD_AUTO_CANCEL="true")
    repo = new_repo(git_server, group="mr")
    secret = register_project(web, repo.project_path, repo.clone_url)
    repo.commit({"ci.yaml": "build:\n  script: [sleep 4]\n"})
    pushed = post_gitlab(web, push_payload(repo, {"a": "1"}, "topic"), token=secret)
    sha = repo.head("topic")
    first = post_mr(web, mr_payload(repo, repo, "topic", sha, iid=5), secret)
    newer = repo.commit({"a": "2"}, branch="topic")
    second = post_mr(web, mr_payload(repo, repo, "topic", newer, iid=5, action="update"), secret)
    assert [a.status_code for a in (pushed, first, second)] == [202] * 3
    states = [wait_for_task(web, a.json()["task_id"])["state"] for a in (pushed, first, second)]
    assert states == ["success", "canceled", "success"]
