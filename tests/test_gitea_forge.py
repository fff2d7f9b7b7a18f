"""Gitea and Forgejo: recorded webhook payloads parsed into builds, refusals and ignored
events; their signatures checked; commit statuses posted to a stand-in of Gitea's API over
HTTP.

The tests GitHub shares are in :mod:`support.forge_tests`, run here for Gitea; this module
has Gitea's own.
"""

from __future__ import annotations

import json

import pytest
import requests
from support.gitea_api import GiteaAPI

from cicd.forges import MergeRequestEvent, PushEvent, gitea

pytest.register_assert_rewrite("support.forge_tests")

from support.forge_tests import *  # noqa: E402, F403 (the shared tests, run for Gitea)
from support.forge_tests import SECRET, Forge, error_of, hex_signature  # noqa: E402

TOKEN = "0123456789abcdef0123456789abcdefTOKEN"
SHA = "67b56589a45103f891bdee7c0546e5d40bc02001"
REPO = "example/example"

GITEA = Forge(
    module=gitea,
    api=GiteaAPI,
    title="Gitea",
    repo=REPO,
    sha=SHA,
    token=TOKEN,
    recordings={
        "push": ("push-event.json", "example/example"),
        "pull_request": ("pull-request-event.json", "example/example"),
        "create": ("create-event.json", "example/example"),
        "delete": ("delete-event.json", "example/example"),
    },
    event_header="X-Gitea-Event",
    delivery_header="X-Gitea-Delivery",
    signature_header="X-Gitea-Signature",
    signature_prefix="",
    push={
        "forge": "gitea",
        "project": "example/example",
        "forge_project_id": 1,
        "clone_url": "http://localhost:3000/example/example.git",
        "web_url": "http://localhost:3000/example/example",
        "ref_type": "branch",
        "ref_name": "master",
        "commit_sha": SHA,
        "before_sha": "0" * 40,  # the push created the branch
        "commit_message": "example\n",
        "commit_author": "example",
        "pusher": "example",
        "delivery_id": "9e1c3e5a-5f0b",
    },
    pull_request={
        "forge": "gitea",
        "project": "example/example",
        "forge_project_id": 1,
        "clone_url": "http://localhost:3000/example/example.git",
        "web_url": "http://localhost:3000/example/example",
        "number": 2,
        "action": "opened",
        # The recording's head is a fork's master.
        "source_project": "example2/example",
        "source_clone_url": "http://localhost:3000/example2/example.git",
        "source_branch": "master",
        "head_ref": "refs/pull/2/head",
        "commit_sha": "48e773f892a831faa47c0a160d1b7f0cd369ae2a",
        "commit_message": None,
        "commit_author": "example2",
        "pusher": "example2",
    },
    builds_on=("opened", "reopened", "synchronized"),
    api_root="/api/v1",
    headers={"Authorization": f"token {TOKEN}", "Accept": "application/json"},
    max_description=255,
    refusals={401: "user does not exist", 404: "couldn't be found"},
    slow=(1.5, 0.3),
)
load, parse, post = GITEA.load, GITEA.parse, GITEA.post


@pytest.fixture
def forge() -> Forge:
    return GITEA


# --- push -----------------------------------------------------------------------------------


def test_the_message_is_the_pushed_commit_s_among_several():
    payload = load("push")
    first = {**payload["commits"][0], "id": "b" * 40, "message": "earlier"}
    payload["commits"] = [first, *payload["commits"]]
    payload["head_commit"] = None
    assert parse(payload).commit_message == "example\n"


def test_pusher_falls_back_to_username():
    payload = load("push")
    payload["pusher"] = {"username": "forgejo-user"}
    assert parse(payload).pusher == "forgejo-user"


# --- events and headers ---------------------------------------------------------------------


def test_forgejo_headers():
    body = GITEA.body("push")
    headers = {"X-Forgejo-Event": "push", "X-Forgejo-Delivery": "f1",
               "X-Forgejo-Signature": hex_signature(body)}  # fmt: skip
    event = gitea.parse(headers, body)
    assert isinstance(event, PushEvent) and event.delivery_id == "f1"
    assert gitea.signature_matches(headers, body, SECRET)


def test_forgejo_delivery_id():
    assert gitea.delivery_id({"X-Forgejo-Delivery": "f1"}) == "f1"


@pytest.mark.parametrize(("kind", "built"), [("pull_request_sync", True),
                                             ("pull_request", True),
                                             ("pull_request_label", False)])  # fmt: skip
def test_event_type_alone_is_understood(kind, built):
    payload = {**load("pull_request"), "action": "synchronized"}
    result = gitea.parse({"X-Gitea-Event-Type": kind}, json.dumps(payload).encode())
    assert isinstance(result, MergeRequestEvent) == built


# --- signature ------------------------------------------------------------------------------


def test_signature_is_bare_hex():
    body = b"{}"
    prefixed = {"X-Gitea-Signature": "sha256=" + hex_signature(body)}
    assert not gitea.signature_matches(prefixed, body, SECRET)
    github_style = {"X-Hub-Signature-256": "sha256=" + hex_signature(body)}
    assert not gitea.signature_matches(github_style, body, SECRET)


# --- statuses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://gitea.example.com", "https://gitea.example.com/api/v1"),
        ("https://gitea.example.com/", "https://gitea.example.com/api/v1"),
        ("https://example.com/git/", "https://example.com/git/api/v1"),
        ("https://codeberg.org/api/v1", "https://codeberg.org/api/v1"),
    ],
)
def test_api_base(url, base):
    assert gitea.api_base(url) == base


def test_statuses_are_listed_newest_first(api):
    for state in ("pending", "running", "failed"):
        post(api, state)
    answer = requests.get(f"{api.url}/api/v1/repos/{REPO}/statuses/{SHA}",
                          params={"access_token": TOKEN}, timeout=5)  # fmt: skip
    assert answer.status_code == 200
    assert [s["status"] for s in answer.json()] == ["failure", "pending", "pending"]


def test_a_redirect_is_not_followed(api):
    """A POST redirected would come back a GET (and its answer look like success)."""
    with GiteaAPI() as other:

        def redirect(request, method):
            request.send_response(301)
            request.send_header("Location", f"https://gitea.example.com{request.path}")
            request.send_header("Content-Length", "0")
            request.end_headers()

        other._handle = redirect
        error = error_of(GITEA, other)
    assert not error.retry and "301" in str(error) and "gitea.example.com" in str(error)


def test_the_stand_in_enforces_giteas_rules(api):
    url = f"{api.url}/api/v1/repos/{REPO}/statuses/{SHA}"
    auth = {"Authorization": f"token {TOKEN}"}
    cases = [
        (requests.post(url, json={"state": "failed"}, headers=auth, timeout=5), 422),
        (requests.post(url, json={"state": "canceled"}, headers=auth, timeout=5), 422),
        (requests.post(url.replace(SHA, "HEAD"), json={"state": "success"}, headers=auth,
                       timeout=5), 422),
        (requests.post(url, data="state=success", headers=auth, timeout=5), 422),
        (requests.post(url, json={"state": "success"}, timeout=5), 401),
        (requests.post(url, json={"state": "success"},
                       headers={"Authorization": f"Bearer {TOKEN}x"}, timeout=5), 401),
        (requests.post(url.replace(REPO, "example/other"), json={"state": "success"},
                       headers=auth, timeout=5), 404),
    ]  # fmt: skip
    assert [answer.status_code for answer, _ in cases] == [code for _, code in cases]
    assert api.statuses == {}
    for query in ("access_token", "token"):
        created = requests.post(url, params={query: TOKEN}, json={"state": "warning"}, timeout=5)
        assert created.status_code == 201
    assert {"id", "status", "description", "target_url", "context", "created_at", "updated_at",
            "url", "creator"} <= created.json().keys()  # fmt: skip
    assert api.states(REPO, SHA, "default") == ["warning", "warning"]
