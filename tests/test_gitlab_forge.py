"""Parsing GitLab's recorded webhook payloads into builds, refusals and ignored events."""

from __future__ import annotations

import json

import pytest
from support.gitlab import FIXTURES

from cicd.errors import PayloadError
from cicd.forges import Ignored, PushEvent, gitlab


def load(name: str) -> dict:
    return json.loads((FIXTURES / "gitlab" / name).read_text())


def parse(payload: dict | bytes, event: str = "Push Hook", **headers: str) -> PushEvent | Ignored:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return gitlab.parse({"X-Gitlab-Event": event, **headers}, body)


def test_push_event_fixture():
    event = parse(load("push-event.json"), **{"X-Gitlab-Event-UUID": "d3f1"})
    assert isinstance(event, PushEvent)
    assert event.project == "mike/diaspora"
    assert event.clone_url == "http://example.com/mike/diaspora.git"
    assert (event.ref_type, event.ref_name) == ("branch", "master")
    assert event.commit_sha == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    assert event.before_sha == "95790bf891e76fee5e1747ab589903a6a1f80f22"
    assert event.commit_message == "fixed readme"
    assert event.commit_author == "GitLab dev user"
    assert event.pusher == "John Smith"
    assert event.delivery_id == "d3f1"


def test_tag_event_fixture_has_no_commits():
    event = parse(load("tag-event.json"), event="Tag Push Hook")
    assert isinstance(event, PushEvent)
    assert (event.ref_type, event.ref_name) == ("tag", "v1.0.0")
    assert event.commit_sha == "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"
    assert event.commit_message is None


def test_system_hook_push():
    event = parse(load("system-push-event.json"), event="System Hook")
    assert isinstance(event, PushEvent) and event.ref_name == "master"


def test_nested_branch_name_is_kept_whole():
    payload = load("push-event.json")
    payload["ref"] = "refs/heads/feature/login/v2"
    assert parse(payload).ref_name == "feature/login/v2"


def test_checkout_sha_wins_over_after():
    payload = load("push-event.json")
    payload["checkout_sha"] = "b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327"
    event = parse(payload)
    assert event.commit_sha == "b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327"
    assert event.commit_message == "Update Catalan translation to e38cb41."


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"after": "0" * 40, "checkout_sha": None}, "was deleted"),
        ({"ref": "refs/merge-requests/4/head"}, "is not under refs/heads/"),
        ({"object_kind": "note"}, "does not start builds"),
    ],
)
def test_ignored_pushes(change, reason):
    payload = {**load("push-event.json"), **change}
    result = parse(payload)
    assert isinstance(result, Ignored) and reason in result.reason


def test_tag_deletion_is_ignored():
    payload = {**load("tag-event.json"), "after": "0" * 40, "checkout_sha": None}
    assert "was deleted" in parse(payload, event="Tag Push Hook").reason


def test_other_event_is_ignored_before_the_body_is_read():
    assert "Pipeline Hook" in parse(b"not even json", event="Pipeline Hook").reason


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ref": "refs/heads/a..b"}, "not a valid git ref name"),
        ({"ref": "refs/heads/x\ny"}, "not a valid git ref name"),
        ({"ref": "refs/heads/" + "a" * 256}, "1 to 255 characters"),
        ({"ref": "refs/heads/$(reboot)"}, None),
        ({"checkout_sha": "HEAD", "after": "HEAD"}, "checkout_sha"),
        ({"project": {"path_with_namespace": "a/b", "git_http_url": "ext::sh -c touch% /tmp/x"}},
         "http:// or https:// URL"),
        ({"project": {"path_with_namespace": "a/b", "git_http_url": "http://u:p@host/a/b.git"}},
         "without user or password"),
        ({"project": "mike/diaspora"}, "'project'"),
    ],
)  # fmt: skip
def test_unsafe_or_broken_fields_are_refused(change, message):
    payload = {**load("push-event.json"), **change}
    if message is None:  # legal in git, harmless to us: kept verbatim, never run by a shell
        assert parse(payload).ref_name == "$(reboot)"
        return
    with pytest.raises(PayloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(payload)


def test_the_token_is_the_header_as_sent():
    assert gitlab.token({"X-Gitlab-Token": "s3cret"}) == "s3cret"
    assert gitlab.token({}) is None
