"""GitHub: recorded webhook payloads parsed into builds, refusals and ignored events; their
signatures checked; commit statuses posted to a stand-in of GitHub's API over HTTP.

The tests Gitea shares are in :mod:`support.forge_tests`, run here for GitHub; this module
has GitHub's own.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
import requests
from support.github_api import GitHubAPI

from cicd.forges import Ignored, github

pytest.register_assert_rewrite("support.forge_tests")

from support.forge_tests import *  # noqa: E402, F403 (the shared tests, run for GitHub)
from support.forge_tests import SECRET, Forge, error_of  # noqa: E402

TOKEN = "ghp_test0123456789abcdefTOKEN"
SHA = "fd489864e7642b48eaad6e3f155c10e46810ec72"
REPO = "binkkatal/sample_app"

GITHUB = Forge(
    module=github,
    api=GitHubAPI,
    title="GitHub",
    repo=REPO,
    sha=SHA,
    token=TOKEN,
    recordings={
        "push": ("push.json", "binkkatal/sample_app"),
        "pull_request": ("pull-request.json", "baxterthehacker/public-repo"),
        "create": ("create.json", "baxterthehacker/public-repo"),
        "delete": ("delete.json", "baxterthehacker/public-repo"),
        "ping": ("ping.json", None),  # a GitHub App's ping names none
    },
    event_header="X-GitHub-Event",
    delivery_header="X-GitHub-Delivery",
    signature_header="X-Hub-Signature-256",
    signature_prefix="sha256=",
    push={
        "forge": "github",
        "project": "binkkatal/sample_app",
        "forge_project_id": 63933911,
        "clone_url": "https://github.com/binkkatal/sample_app.git",
        "web_url": "https://github.com/binkkatal/sample_app",
        "ref_type": "branch",
        "ref_name": "master",
        "commit_sha": SHA,
        "before_sha": "737d38c599c1b2991664dfc6155d6bf516fcce36",
        "commit_message": "test a push event",
        "commit_author": "binkkatal",
        "pusher": "binkkatal",
        "delivery_id": "72d3162e-cc78-11e3-81ab",
    },
    pull_request={
        "forge": "github",
        "project": "baxterthehacker/public-repo",
        "forge_project_id": 35129377,
        "clone_url": "https://github.com/baxterthehacker/public-repo.git",
        "web_url": "https://github.com/baxterthehacker/public-repo",
        "number": 1,
        "action": "opened",
        # The recording's head is a branch of the base repository itself.
        "source_project": "baxterthehacker/public-repo",
        "source_clone_url": "https://github.com/baxterthehacker/public-repo.git",
        "source_branch": "changes",
        "head_ref": "refs/pull/1/head",
        "commit_sha": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        "commit_message": None,
        "commit_author": "baxterthehacker",
        "pusher": "baxterthehacker",
    },
    builds_on=("opened", "reopened", "synchronize"),
    api_root="/api/v3",
    headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/vnd.github+json"},
    max_description=140,
    refusals={401: "Bad credentials", 404: "Not Found"},
    slow=(2.5, 1.0),  # PyGithub waits whole seconds
)
load, parse, post = GITHUB.load, GITHUB.parse, GITHUB.post


@pytest.fixture
def forge() -> Forge:
    return GITHUB


# --- push -----------------------------------------------------------------------------------


def test_lightweight_tag_without_head_commit_builds_after():
    payload = {**load("push"), "ref": "refs/tags/v2", "head_commit": None}
    event = parse(payload)
    # The message comes from the pushed commit's entry in "commits", if there is one.
    assert event.commit_sha == SHA and event.commit_message == "test a push event"
    event = parse({**payload, "commits": []})
    assert event.commit_sha == SHA and event.commit_message is None


# --- pull requests --------------------------------------------------------------------------


def test_pull_request_from_a_fork():
    payload = load("pull_request")
    payload["pull_request"]["head"]["repo"].update(
        full_name="someone/public-repo", clone_url="https://github.com/someone/public-repo.git"
    )
    event = parse(payload, event="pull_request")
    assert event.project == "baxterthehacker/public-repo"
    assert event.source_project == "someone/public-repo"
    assert event.source_clone_url == "https://github.com/someone/public-repo.git"


def test_number_falls_back_to_the_pull_request():
    payload = load("pull_request")
    del payload["number"]
    assert parse(payload, event="pull_request").head_ref == "refs/pull/1/head"


# --- other events ---------------------------------------------------------------------------


def test_ping_is_ignored():
    assert parse(load("ping"), event="ping") == Ignored("ping")


def test_a_ping_names_no_repository():
    assert github.repository({"X-GitHub-Event": "ping"}, GITHUB.body("ping")) is None


# --- signature ------------------------------------------------------------------------------


def test_signature_needs_the_sha256_prefix():
    body = b'{"zen": "x"}'
    digest = GITHUB.sign(body)["X-Hub-Signature-256"].removeprefix("sha256=")
    assert not github.signature_matches({"X-Hub-Signature-256": digest}, body, SECRET)
    assert not github.signature_matches({"X-Hub-Signature-256": f"sha1={digest}"}, body, SECRET)
    sha1 = hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    assert not github.signature_matches({"X-Hub-Signature": f"sha1={sha1}"}, body, SECRET)


# --- statuses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://github.com", "https://api.github.com"),
        ("https://github.com/", "https://api.github.com"),
        ("https://www.github.com", "https://api.github.com"),
        ("https://GitHub.com", "https://api.github.com"),
        ("https://ghe.example.com", "https://ghe.example.com/api/v3"),
        ("https://ghe.example.com/", "https://ghe.example.com/api/v3"),
        ("https://ghe.example.com/api/v3", "https://ghe.example.com/api/v3"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/api/v3"),
    ],
)
def test_api_base(url, base):
    assert github.api_base(url) == base


def test_listing_statuses_newest_first(api):
    post(api, "pending")
    post(api, "failed", name="opscd/test")
    answer = requests.get(f"{api.url}/api/v3/repos/{REPO}/commits/{SHA}/statuses",
                          headers={"Authorization": f"token {TOKEN}"}, timeout=5)  # fmt: skip
    assert answer.status_code == 200
    assert [(s["context"], s["state"]) for s in answer.json()] == [
        ("opscd/test", "failure"), ("opscd/build", "pending")]  # fmt: skip


def test_rate_limit_is_retried(api):
    api.fail_next(1, 403, "API rate limit exceeded for user ID 1.")
    assert error_of(GITHUB, api).retry


def test_forbidden_is_not_retried(api):
    api.fail_next(1, 403, "Resource not accessible by personal access token")
    error = error_of(GITHUB, api)
    assert not error.retry and "Resource not accessible" in str(error)


def test_the_stand_in_enforces_githubs_rules(api):
    url = f"{api.url}/api/v3/repos/{REPO}/statuses/{SHA}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        (requests.post(url, json={"state": "failed"}, headers=auth, timeout=5), 422),
        (requests.post(url, json={"state": "success", "description": "x" * 141}, headers=auth,
                       timeout=5), 422),
        (requests.post(url.replace(SHA, "main"), json={"state": "success"}, headers=auth,
                       timeout=5), 422),
        (requests.post(url, data="state=success", headers=auth, timeout=5), 400),
        (requests.post(url, json={"state": "success"}, timeout=5), 401),
        (requests.post(url, json={"state": "success"}, headers={"Authorization": "Basic x"},
                       timeout=5), 401),
    ]  # fmt: skip
    assert [answer.status_code for answer, _ in cases] == [code for _, code in cases]
    assert cases[0][0].json()["message"] == "Validation Failed"
    assert cases[0][0].json()["errors"][0]["field"] == "state"
    assert api.statuses == {}
    created = requests.post(url, json={"state": "success"}, headers=auth, timeout=5)
    assert created.status_code == 201
    assert {"id", "state", "description", "target_url", "context", "created_at", "updated_at",
            "url"} <= created.json().keys()  # fmt: skip
