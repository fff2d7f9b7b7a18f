"""GitLab: the delivery's ``X-Gitlab-Token``, push, tag push and merge request events
parsed, and commit statuses posted.

Payload format: https://docs.gitlab.com/user/project/integrations/webhook_events/
(push events, tag events, merge request events, and system hooks carrying the same push
payload). A merge request builds when it is opened, reopened, or updated with new commits
(an ``update`` whose ``object_attributes.oldrev`` is set); a title or label change does not.
Statuses: https://docs.gitlab.com/api/commits/#set-the-pipeline-status-of-a-commit
(``POST /projects/:id/statuses/:sha``), through python-gitlab.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cicd.errors import PayloadError
from cicd.forges import (
    Ignored,
    MergeRequestEvent,
    PushEvent,
    StatusError,
    StatusRefused,
    validate_clone_url,
    validate_project_id,
    validate_project_path,
    validate_ref_name,
    validate_sha,
)

__all__ = ["FORGE", "token", "delivery_id", "parse", "post_status"]

FORGE = "gitlab"
ZERO_SHA = "0" * 40
_BUILD_EVENTS = {"Push Hook": "push", "Tag Push Hook": "tag_push", "System Hook": None,
                 "Merge Request Hook": "merge_request"}  # fmt: skip
#: Merge request actions that bring commits to build (``update`` only with new commits).
_MR_ACTIONS = ("open", "reopen", "update")
_PREFIXES = {"push": ("refs/heads/", "branch"), "tag_push": ("refs/tags/", "tag")}


def token(headers: Mapping[str, str]) -> str | None:
    """The secret token the delivery carries (``X-Gitlab-Token``), to be checked against the
    registered project's (:func:`cicd.projects.secret_matches`)."""
    return headers.get("X-Gitlab-Token")


def delivery_id(headers: Mapping[str, str]) -> str | None:
    """The id GitLab keeps when it redelivers an event, or the client's ``Idempotency-Key``."""
    value = headers.get("X-Gitlab-Event-UUID") or headers.get("Idempotency-Key")
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 128 or not value.isprintable():
        raise PayloadError("X-Gitlab-Event-UUID / Idempotency-Key must be 1 to 128 printable chars")
    return value


def parse(headers: Mapping[str, str], body: bytes) -> PushEvent | MergeRequestEvent | Ignored:
    """Turn one delivery into a build to run, or the reason it builds nothing.

    Raises :class:`PayloadError` when the body is not JSON or lacks what a push
    event must carry; the message names the field.
    """
    event = headers.get("X-Gitlab-Event", "")
    if event not in _BUILD_EVENTS:
        return Ignored(f"event {event or '(no X-Gitlab-Event header)'!r} does not start builds")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PayloadError(f"body is not valid JSON: {error}") from None
    except RecursionError:
        raise PayloadError("body is nested too deeply to be a GitLab event") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise PayloadError(f"body is not a GitLab event: {error}") from None
    if not isinstance(payload, dict):
        raise PayloadError("body must be a JSON object")

    kind = payload.get("object_kind") or payload.get("event_name")
    if kind == "merge_request":
        return _merge_request(headers, payload)
    if not isinstance(kind, str) or kind not in _PREFIXES:
        return Ignored(f"{event} of kind {str(kind)[:64]!r} does not start builds")
    prefix, ref_type = _PREFIXES[kind]

    ref = _string(payload, "ref")
    if not ref.startswith(prefix):
        return Ignored(f"ref {ref[:300]!r} is not under {prefix}")
    after = _string(payload, "after")
    if after == ZERO_SHA:
        return Ignored(f"{ref_type} {ref[len(prefix) :]!r} was deleted")
    ref_name = validate_ref_name(ref[len(prefix) :])
    sha = validate_sha(payload.get("checkout_sha") or after, "checkout_sha")
    before = payload.get("before")

    project = _object(payload, "project")
    path = validate_project_path(project.get("path_with_namespace"), "project.path_with_namespace")
    project_id = validate_project_id(payload.get("project_id", project.get("id")), "project_id")
    repository = payload.get("repository") if isinstance(payload.get("repository"), dict) else {}
    clone_url = project.get("git_http_url") or repository.get("git_http_url")
    clone_url = validate_clone_url(clone_url, "project.git_http_url")

    commit = _head_commit(payload, sha)
    author = commit.get("author") if isinstance(commit.get("author"), dict) else {}
    return PushEvent(
        forge=FORGE,
        delivery_id=delivery_id(headers),
        project=path,
        forge_project_id=project_id,
        clone_url=clone_url,
        web_url=_optional(project.get("web_url"), 1024),
        ref_type=ref_type,
        ref_name=ref_name,
        commit_sha=sha,
        before_sha=before if isinstance(before, str) and len(before) <= 64 else None,
        commit_message=_optional(commit.get("message"), 16000),
        commit_author=_optional(author.get("name"), 255),
        pusher=_optional(payload.get("user_username") or payload.get("user_name"), 255),
    )


def _merge_request(
    headers: Mapping[str, str], payload: dict[str, Any]
) -> MergeRequestEvent | Ignored:
    """A merge request event: the target project's delivery of the source branch's head."""
    attributes = _object(payload, "object_attributes")
    action = attributes.get("action")
    if action not in _MR_ACTIONS:
        return Ignored(f"merge request action {str(action)[:64]!r} does not start builds")
    if action == "update" and not attributes.get("oldrev"):
        return Ignored("merge request update without new commits does not start builds")
    iid = validate_project_id(attributes.get("iid"), "object_attributes.iid")
    if iid is None:
        raise PayloadError("field 'object_attributes.iid' is missing")
    project = _object(payload, "project")
    path = validate_project_path(project.get("path_with_namespace"), "project.path_with_namespace")
    source = _object(attributes, "source")
    commit = _object(attributes, "last_commit")
    author = commit.get("author") if isinstance(commit.get("author"), dict) else {}
    user = payload.get("user") if isinstance(payload.get("user"), dict) else {}
    return MergeRequestEvent(
        forge=FORGE,
        delivery_id=delivery_id(headers),
        project=path,
        forge_project_id=validate_project_id(project.get("id"), "project.id"),
        clone_url=validate_clone_url(project.get("git_http_url"), "project.git_http_url"),
        web_url=_optional(project.get("web_url"), 1024),
        number=iid,
        action=action,
        source_project=validate_project_path(
            source.get("path_with_namespace"), "object_attributes.source.path_with_namespace"
        ),
        source_clone_url=validate_clone_url(
            source.get("git_http_url"), "object_attributes.source.git_http_url"
        ),
        source_branch=validate_ref_name(_string(attributes, "source_branch",
                                                "object_attributes.source_branch")),
        head_ref=f"refs/merge-requests/{iid}/head",
        commit_sha=validate_sha(commit.get("id"), "object_attributes.last_commit.id"),
        commit_message=_optional(commit.get("message"), 16000),
        commit_author=_optional(author.get("name"), 255),
        pusher=_optional(user.get("username") or user.get("name"), 255),
    )  # fmt: skip


def post_status(
    api_url: str, token: str, project: int | str, sha: str, *, state: str, ref: str, name: str,
    description: str, target_url: str | None, timeout: float,
) -> None:  # fmt: skip
    """Set commit ``sha``'s status ``name`` to ``state`` (pending, running, success, failed,
    canceled) as the token's user; ``project`` is GitLab's id of it or its path.

    Raises :class:`StatusRefused` for GitLab's answer to a repeated state ("Cannot
    transition status via :run from :running"), :class:`StatusError` otherwise
    (``retry`` for 409, 429, 5xx and no answer).
    """
    import gitlab as gitlab_api  # here: python-gitlab costs 0.1 s to import, and only the
    import requests  # reporter posts statuses

    data = {"state": state, "ref": ref, "name": name, "description": description}
    if target_url:
        data["target_url"] = target_url
    client = gitlab_api.Gitlab(api_url, private_token=token, timeout=timeout,
                               user_agent="OpsCD")  # fmt: skip
    commit = client.projects.get(project, lazy=True).commits.get(sha, lazy=True)
    try:  # no retries inside: the outbox backs off and keeps the order of the states
        commit.statuses.create(data, obey_rate_limit=False, retry_transient_errors=False)
    except gitlab_api.GitlabError as error:
        code, message = error.response_code, str(error.error_message)[:500]
        if code == 400 and "Cannot transition" in message:
            raise StatusRefused(f"GitLab has it already: {message}") from None
        retry = code is None or code in (408, 409, 429) or code >= 500
        raise StatusError(f"GitLab answered {code}: {message}", retry=retry) from None
    except requests.RequestException as error:
        raise StatusError(f"GitLab did not answer: {type(error).__name__}", retry=True) from None


def _head_commit(payload: dict[str, Any], sha: str) -> dict[str, Any]:
    """The pushed commit's entry in ``commits``; tag pushes and big pushes may lack it."""
    commits = payload.get("commits")
    if not isinstance(commits, list):
        return {}
    for commit in commits:
        if isinstance(commit, dict) and commit.get("id") == sha:
            return commit
    return {}


def _string(data: dict[str, Any], key: str, name: str | None = None) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"field {name or key!r} is missing or not a non-empty string")
    return value


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise PayloadError(f"field {key!r} is missing or not an object")
    return value


def _optional(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None
