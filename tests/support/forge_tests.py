"""The tests GitHub and Gitea share, written once for both: ``tests/test_github_forge.py`` and
``tests/test_gitea_forge.py`` import them, each with a ``forge`` fixture that answers its
:class:`Forge` (what its recordings hold, its headers, its stand-in API), and so run them
for their forge; what one forge alone does stays in its own module.

This is the one module here with pytest in it (it holds tests; the bench never imports it).
The test modules register it for pytest's assertion rewriting before they import it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from cicd.errors import PayloadError
from cicd.forges import Ignored, MergeRequestEvent, PushEvent, StatusError

from .gitlab import FIXTURES
from .status_api import RepositoryAPI

SECRET = "webhook-secret"
#: In a table of headers: the forge's delivery id header.
DELIVERY = "<delivery header>"


def hex_signature(body: bytes, secret: str = SECRET) -> str:
    """The hex HMAC SHA-256 of ``body``, as both forges sign deliveries."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Forge:
    """One forge, as the shared tests need it."""

    module: ModuleType
    #: Its stand-in API.
    api: type[RepositoryAPI]
    title: str
    #: The repository, commit and token statuses are posted for.
    repo: str
    sha: str
    token: str
    #: Event → the recording of a delivery (its file) and the repository it names.
    recordings: dict[str, tuple[str, str | None]]
    event_header: str
    delivery_header: str
    signature_header: str
    #: What comes before the hex HMAC in the signature header.
    signature_prefix: str
    #: What the recorded push parses into, and the recorded pull request.
    push: dict[str, Any]
    pull_request: dict[str, Any]
    #: The pull request actions that build.
    builds_on: tuple[str, ...]
    #: The API's root path on the stand-in.
    api_root: str
    #: Headers each status POST carries (besides ``User-Agent: OpsCD``).
    headers: dict[str, str]
    max_description: int
    #: HTTP status → what the error says when the forge refuses so.
    refusals: dict[int, str]
    #: (seconds the API waits, seconds the post waits): no answer in time.
    slow: tuple[float, float]

    def load(self, event: str) -> dict[str, Any]:
        """The recorded delivery of ``event``."""
        name = self.recordings[event][0]
        return json.loads((FIXTURES / self.module.FORGE / name).read_text())

    def body(self, event: str) -> bytes:
        return json.dumps(self.load(event)).encode()

    def parse(self, payload: dict | bytes, event: str = "push", **headers: str) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.module.parse({self.event_header: event, **headers}, body)

    def sign(self, body: bytes, secret: str = SECRET) -> dict[str, str]:
        """The signature header of ``body``, as the forge sends it."""
        return {self.signature_header: self.signature_prefix + hex_signature(body, secret)}

    def post(self, api: RepositoryAPI, state: str = "success", api_url: str | None = None,
             **kwargs: Any) -> None:  # fmt: skip
        arguments = {"project": self.repo, "sha": self.sha, "state": state, "ref": "master",
                     "name": "opscd/build", "description": f"build {state}",
                     "target_url": "http://ci.example/tasks/1", "timeout": 5.0,
                     "token": self.token, **kwargs}  # fmt: skip
        self.module.post_status(api_url or api.url, **arguments)


def error_of(forge: Forge, api: RepositoryAPI, state: str = "success", **kwargs) -> StatusError:
    with pytest.raises(StatusError) as caught:
        forge.post(api, state, **kwargs)
    assert forge.token not in str(caught.value)
    return caught.value


def changed(payload: dict, path: str, value: object) -> dict:
    """``payload`` with the field at ``path`` (``a.b.c``) set to ``value``."""
    *parents, key = path.split(".")
    target = payload
    for parent in parents:
        target = target[parent]
    target[key] = value
    return payload


# --- push -----------------------------------------------------------------------------------


def test_push_fixture(forge):
    event = forge.parse(forge.load("push"), **{forge.delivery_header: forge.push["delivery_id"]})
    assert isinstance(event, PushEvent)
    assert {name: getattr(event, name) for name in forge.push} == forge.push


def test_tag_push_builds_the_tagged_commit(forge):
    """Tags come as ``push`` too; an annotated tag's ``after`` is the tag object."""
    payload = {**forge.load("push"), "ref": "refs/tags/v1.0.0", "commits": [],
               "after": "a" * 40}  # fmt: skip
    event = forge.parse(payload)
    assert (event.ref_type, event.ref_name) == ("tag", "v1.0.0")
    assert event.commit_sha == forge.sha  # head_commit.id, not the tag object
    assert event.commit_message == forge.push["commit_message"]


def test_nested_branch_name_is_kept_whole(forge):
    payload = {**forge.load("push"), "ref": "refs/heads/feature/login/v2"}
    assert forge.parse(payload).ref_name == "feature/login/v2"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"deleted": True}, "branch 'master' was deleted"),
        ({"after": "0" * 40, "head_commit": None}, "was deleted"),
        ({"after": "0" * 40, "commits": [], "head_commit": None}, "branch 'master' was deleted"),
        ({"ref": "refs/tags/v1", "deleted": True}, "tag 'v1' was deleted"),
        ({"ref": "refs/tags/v1", "after": "0" * 40}, "tag 'v1' was deleted"),
        ({"ref": "refs/notes/commits"}, "neither a branch nor a tag"),
        ({"ref": "refs/pull/2/head"}, "neither a branch nor a tag"),
    ],
)
def test_ignored_pushes(forge, change, reason):
    result = forge.parse({**forge.load("push"), **change})
    assert isinstance(result, Ignored) and reason in result.reason


# --- pull requests --------------------------------------------------------------------------


def test_pull_request_fixture(forge):
    event = forge.parse(forge.load("pull_request"), event="pull_request")
    assert isinstance(event, MergeRequestEvent)
    assert {name: getattr(event, name) for name in forge.pull_request} == forge.pull_request


@pytest.mark.parametrize("action", ["opened", "reopened", "synchronize", "synchronized", "closed",
                                    "edited", "labeled", "label_updated", None])  # fmt: skip
def test_pull_request_actions_that_build_and_the_others_ignored(forge, action):
    payload = {**forge.load("pull_request"), "action": action}
    result = forge.parse(payload, event="pull_request")
    if action in forge.builds_on:
        assert isinstance(result, MergeRequestEvent) and result.action == action
    else:
        assert isinstance(result, Ignored) and repr(str(action)) in result.reason


def test_pull_request_of_a_deleted_fork_is_ignored(forge):
    payload = forge.load("pull_request")
    payload["pull_request"]["head"]["repo"] = None
    result = forge.parse(payload, event="pull_request")
    assert isinstance(result, Ignored) and "no longer exists" in result.reason


# --- other events and headers ---------------------------------------------------------------


@pytest.mark.parametrize("event", ["create", "delete"])
def test_create_and_delete_are_ignored(forge, event):
    result = forge.parse(forge.load(event), event=event)
    assert isinstance(result, Ignored) and repr(event) in result.reason


def test_other_events_are_ignored_before_the_body_is_read(forge):
    assert "'issues'" in forge.parse(b"not even json", event="issues").reason
    assert f"no {forge.event_header}" in forge.module.parse({}, b"{}").reason


def test_header_names_are_read_in_any_case(forge):
    headers = {forge.event_header.lower(): "push", forge.delivery_header.lower(): "d1"}
    event = forge.module.parse(headers, forge.body("push"))
    assert isinstance(event, PushEvent) and event.delivery_id == "d1"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({DELIVERY: " 72d3162e "}, "72d3162e"),
        ({DELIVERY: " 9e1c "}, "9e1c"),
        ({"Idempotency-Key": "retry-1"}, "retry-1"),
        ({DELIVERY: "a", "Idempotency-Key": "b"}, "a"),
        ({}, None),
    ],
)
def test_delivery_id(forge, headers, expected):
    headers = {forge.delivery_header if k == DELIVERY else k: v for k, v in headers.items()}
    assert forge.module.delivery_id(headers) == expected


@pytest.mark.parametrize("value", ["x" * 129, "a\x00b", "a\nb", "   ", "  "])
def test_bad_delivery_ids_are_refused(forge, value):
    with pytest.raises(PayloadError, match=forge.delivery_header):
        forge.module.delivery_id({forge.delivery_header: value})


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"push"', "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"ref": ' + b"9" * 5000 + b"}", "not a {title} event"),
        (b"payload=%7B%7D", "content type to application/json"),
    ],
)
def test_malformed_bodies(forge, body, message):
    with pytest.raises(PayloadError, match=message.format(title=forge.title)):
        forge.parse(body)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ref": "refs/heads/a..b"}, "not a valid git ref name"),
        ({"ref": "refs/heads/x\ny"}, "not a valid git ref name"),
        ({"ref": "refs/heads/x y"}, "not a valid git ref name"),
        ({"ref": "refs/heads/-rf"}, "not a valid git ref name"),
        ({"ref": "refs/tags/v1.lock"}, "not a valid git ref name"),
        ({"ref": None}, "'ref'"),
        ({"ref": 7}, "'ref'"),
        ({"after": "HEAD"}, "after"),
        ({"after": "67b5658"}, "after"),
        ({"after": None}, "'after'"),
        ({"repository": None}, "'repository'"),
        ({"repository": []}, "'repository'"),
        ({"repository": {"full_name": "example", "id": 1, "clone_url": "http://h/example.git"}},
         None),
        ({"repository": {"full_name": "../etc", "id": 1}}, "repository.full_name"),
        ({"repository": {"full_name": "a/b/", "id": 1}}, "repository.full_name"),
        ({"repository": {"full_name": "a/b", "id": "1", "clone_url": "https://h/a/b.git"}},
         "repository.id"),
        ({"repository": {"full_name": "a/b", "id": -1}}, "repository.id"),
        ({"repository": {"full_name": "a/b", "clone_url": "ext::sh -c touch% /tmp/x"}},
         "http:// or https:// URL"),
        ({"repository": {"full_name": "a/b", "clone_url": "git@localhost:a/b.git"}},
         "http:// or https:// URL"),
        ({"repository": {"full_name": "a/b", "clone_url": "https://u:p@github.com/a/b.git"}},
         "without user or password"),
        ({"repository": {"full_name": "a/b", "clone_url": "http://root:pw@localhost/a/b.git"}},
         "without user or password"),
    ],
)  # fmt: skip
def test_unsafe_or_broken_push_fields_are_refused(forge, change, message):
    payload = {**forge.load("push"), **change}
    if message is None:  # a single-part path is valid
        assert forge.parse(payload).project == "example"
        return
    with pytest.raises(PayloadError, match=message):
        forge.parse(payload)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("number", 0, "'number'"),
        ("number", "1", "'number'"),
        ("number", None, "'number'"),
        ("number", True, "'number'"),
        ("pull_request", None, "'pull_request'"),
        ("pull_request", [], "'pull_request'"),
        ("pull_request.head", "changes", "'pull_request.head'"),
        ("pull_request.head", None, "'pull_request.head'"),
        ("pull_request.head.repo", "fork", "'pull_request.head.repo'"),
        ("pull_request.head.ref", "a..b", "not a valid git ref name"),
        ("pull_request.head.ref", "--upload-pack=x", "not a valid git ref name"),
        ("pull_request.head.ref", None, "pull_request.head.ref"),
        ("pull_request.head.sha", "HEAD", "pull_request.head.sha"),
        ("pull_request.head.sha", "48E773F892A831FAA47C0A160D1B7F0CD369AE2A",
         "pull_request.head.sha"),
        ("pull_request.head.repo.full_name", "a/../b", "pull_request.head.repo.full_name"),
        ("pull_request.head.repo.full_name", None, "pull_request.head.repo.full_name"),
        ("pull_request.head.repo.clone_url", "https://t:x-oauth@github.com/a/b.git",
         "pull_request.head.repo.clone_url"),
        ("pull_request.head.repo.clone_url", "http://u:p@localhost:3000/example2/example.git",
         "pull_request.head.repo.clone_url"),
        ("repository.clone_url", "file:///etc", "repository.clone_url"),
        ("repository.full_name", "example/exa mple", "repository.full_name"),
    ],
)  # fmt: skip
def test_unsafe_or_broken_pull_request_fields_are_refused(forge, path, value, message):
    payload = changed(forge.load("pull_request"), path, value)
    with pytest.raises(PayloadError, match=message.replace(".", r"\.")):
        forge.parse(payload, event="pull_request")


# --- repository and signature -----------------------------------------------------------------


@pytest.mark.parametrize("event", ["push", "pull_request", "create", "delete"])
def test_repository_of_recorded_deliveries(forge, event):
    expected = forge.recordings[event][1]
    assert forge.module.repository({forge.event_header: event}, forge.body(event)) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff",
        b"\x00",
        b"[" * 100_000,
        b"{" * 100_000,
        b"[]",
        b"{}",
        b'{"repository": "a/b"}',
        b'{"repository": {"full_name": 7}}',
        b'{"repository": {"full_name": ""}}',
        b'{"n": ' + b"9" * 5000 + b"}",
    ],
)
def test_repository_of_any_delivery(forge, body):
    assert forge.module.repository({forge.event_header: "ping"}, body) is None


def test_signature(forge):
    body = forge.body("push")
    matches = forge.module.signature_matches
    assert matches(forge.sign(body), body, SECRET)
    upper = forge.signature_prefix + hex_signature(body).upper()
    assert matches({forge.signature_header.lower(): upper}, body, SECRET)
    assert not matches(forge.sign(body, "other"), body, SECRET)
    assert not matches(forge.sign(body), body + b" ", SECRET)
    assert not matches(forge.sign(body), body[:-1], SECRET)
    assert not matches({}, body, SECRET)
    assert not matches(forge.sign(body), body, "")


@pytest.mark.parametrize("value", ["é", "ü" * 64])
def test_signature_with_non_ascii_does_not_match(forge, value):
    headers = {forge.signature_header: forge.signature_prefix + value}
    assert not forge.module.signature_matches(headers, b"{}", SECRET)


# --- statuses -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://ghe.example.com", "ghe.example.com", "",
                                 "ssh://git@gitea.example.com"])  # fmt: skip
def test_api_base_needs_an_http_url(forge, url):
    with pytest.raises(ValueError, match="http"):
        forge.module.api_base(url)


@pytest.fixture(name="api")
def api_fixture(forge):
    """The forge's stand-in API, serving the repository statuses are posted for."""
    with forge.api() as server:
        server.add_repository(forge.repo, forge.token)
        yield server


@pytest.mark.parametrize(("state", "expected"), [("pending", "pending"), ("running", "pending"),
                                                 ("success", "success"), ("failed", "failure"),
                                                 ("canceled", "error")])  # fmt: skip
def test_each_state_becomes_the_forge_s_in_one_post(forge, api, state, expected):
    forge.post(api, state)
    assert api.states(forge.repo, forge.sha, "opscd/build") == [expected]
    assert len(api.requests) == 1, api.requests  # no GET of the repository or the commit
    request = api.posts()[0]
    assert request["path"] == f"{forge.api_root}/repos/{forge.repo}/statuses/{forge.sha}"
    assert {name: request["headers"][name] for name in forge.headers} == forge.headers
    assert request["headers"]["User-Agent"] == "OpsCD"
    assert request["body"] == {"state": expected, "description": f"build {state}",
                               "context": "opscd/build",
                               "target_url": "http://ci.example/tasks/1"}  # fmt: skip


@pytest.mark.parametrize(("final", "expected"), [("success", "success"), ("failed", "failure")])
def test_a_build_s_states_in_order(forge, api, final, expected):
    for state in ("pending", "running", final):
        forge.post(api, state)
    assert api.states(forge.repo, forge.sha, "opscd/build") == ["pending", "pending", expected]
    assert len(api.posts()) == len(api.requests) == 3
    status = api.last(forge.repo, forge.sha, "opscd/build")
    assert status["target_url"] == "http://ci.example/tasks/1"


@pytest.mark.parametrize("description", ["x" * 300, "é" * 400])
def test_description_is_cut_to_the_forge_s_limit_and_target_url_is_optional(
    forge, api, description
):
    forge.post(api, description=description, target_url=None)
    sent = api.posts()[0]["body"]
    assert len(sent["description"]) == forge.max_description and "target_url" not in sent
    assert api.refused == []


@pytest.mark.parametrize("token", ["ghp_wrong_token_value", "not-the-token"])
def test_wrong_token_is_not_retried(forge, api, token):
    error = error_of(forge, api, token=token)
    assert not error.retry and "401" in str(error) and forge.refusals[401] in str(error)
    assert token not in str(error)


@pytest.mark.parametrize("project", ["binkkatal/other", "example/missing"])
def test_unknown_repository_is_not_retried(forge, api, project):
    error = error_of(forge, api, project=project)
    assert not error.retry and "404" in str(error) and forge.refusals[404] in str(error)


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408, 409, 429])
def test_server_errors_are_retried(forge, api, code):
    api.fail_next(1, code)
    error = error_of(forge, api)
    assert error.retry and f"answered {code}" in str(error)
    assert len(api.requests) == 1  # the client's own retries are off: the outbox retries
    forge.post(api)
    assert api.states(forge.repo, forge.sha, "opscd/build") == ["success"]
    assert len(api.posts()) == 2


@pytest.mark.parametrize("code", [400, 403, 422])
def test_client_errors_are_not_retried(forge, api, code):
    api.fail_next(1, code)
    assert not error_of(forge, api).retry


def test_stopped_server_is_retried(forge):
    api = forge.api().start()
    api.add_repository(forge.repo, forge.token)
    api.stop()
    error = error_of(forge, api)
    assert error.retry and "did not answer" in str(error)


def test_no_answer_in_time_is_retried(forge, api):
    api.delay, timeout = forge.slow
    error = error_of(forge, api, timeout=timeout)
    assert error.retry and "Timeout" in str(error)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"project": "a/../b"}, "owner/repo"),
        ({"project": "example/.."}, "owner/repo"),
        ({"project": "example/example/extra"}, "owner/repo"),
        ({"project": 63933911}, "owner/repo"),
        ({"sha": "HEAD"}, "not a commit id"),
        ({"sha": "67b5658"}, "not a commit id"),
        ({"state": "skipped"}, "no {title} state"),
        ({"state": "warning"}, "no {title} state"),
        ({"token": ""}, "no {title} API token"),
        ({"api_url": "ftp://ghe.example.com"}, "http"),
        ({"api_url": "gitea.example.com"}, "http"),
    ],
)
def test_what_the_forge_would_refuse_is_not_sent(forge, api, change, message):
    error = error_of(forge, api, **change)
    assert not error.retry and message.format(title=forge.title) in str(error)
    assert api.requests == []


#: What ``from support.forge_tests import *`` gives a forge's test module: the tests above and
#: their ``api`` fixture (the module adds its own ``forge`` fixture).
__all__ = ["api_fixture", *(name for name in dict(globals()) if name.startswith("test_"))]
