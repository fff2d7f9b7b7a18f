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
from cicd.forges.payloads import (
    commit_of,
    delivery_header,
    load_json,
    object_field,
    optional_text,
    string_field,
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
    return delivery_header(headers, "X-Gitlab-Event-UUID", "Idempotency-Key")


def parse(headers: Mapping[str, str], body: bytes) -> PushEvent | MergeRequestEvent | Ignored:
    """Turn one delivery into a build to run, or the reason it builds nothing.

    Raises :class:`PayloadError` when the body is not JSON or lacks what a push
    event must carry; the message names the field.
    """
    event = headers.get("X-Gitlab-Event", "")
    if event not in _BUILD_EVENTS:
        return Ignored(f"event {event or '(no X-Gitlab-Event header)'!r} does not start builds")
    payload = load_json(body, "GitLab")

    kind = payload.get("object_kind") or payload.get("event_name")
    if kind == "merge_request":
        return _merge_request(headers, payload)
    if not isinstance(kind, str) or kind not in _PREFIXES:
        return Ignored(f"{event} of kind {str(kind)[:64]!r} does not start builds")
    prefix, ref_type = _PREFIXES[kind]

    ref = string_field(payload, "ref")
    if not ref.startswith(prefix):
        return Ignored(f"ref {ref[:300]!r} is not under {prefix}")
    after = string_field(payload, "after")
    if after == ZERO_SHA:
        return Ignored(f"{ref_type} {ref[len(prefix) :]!r} was deleted")
    ref_name = validate_ref_name(ref[len(prefix) :])
    sha = validate_sha(payload.get("checkout_sha") or after, "checkout_sha")
    before = payload.get("before")

    project = object_field(payload, "project")
    path = validate_project_path(project.get("path_with_namespace"), "project.path_with_namespace")
    project_id = validate_project_id(payload.get("project_id", project.get("id")), "project_id")
    repository = payload.get("repository") if isinstance(payload.get("repository"), dict) else {}
    clone_url = project.get("git_http_url") or repository.get("git_http_url")
    clone_url = validate_clone_url(clone_url, "project.git_http_url")

    commit = commit_of(payload, sha)
    author = commit.get("author") if isinstance(commit.get("author"), dict) else {}
    return PushEvent(
        forge=FORGE,
        delivery_id=delivery_id(headers),
        project=path,
        forge_project_id=project_id,
        clone_url=clone_url,
        web_url=optional_text(project.get("web_url"), 1024),
        ref_type=ref_type,
        ref_name=ref_name,
        commit_sha=sha,
        before_sha=before if isinstance(before, str) and len(before) <= 64 else None,
        commit_message=optional_text(commit.get("message"), 16000),
        commit_author=optional_text(author.get("name"), 255),
        pusher=optional_text(payload.get("user_username") or payload.get("user_name"), 255),
    )


def _merge_request(
    headers: Mapping[str, str], payload: dict[str, Any]
) -> MergeRequestEvent | Ignored:
    """A merge request event: the target project's delivery of the source branch's head."""
    attributes = object_field(payload, "object_attributes")
    action = attributes.get("action")
    if action not in _MR_ACTIONS:
        return Ignored(f"merge request action {str(action)[:64]!r} does not start builds")
    if action == "update" and not attributes.get("oldrev"):
        return Ignored("merge request update without new commits does not start builds")
    iid = validate_project_id(attributes.get("iid"), "object_attributes.iid")
    if iid is None:
        raise PayloadError("field 'object_attributes.iid' is missing")
    project = object_field(payload, "project")
    path = validate_project_path(project.get("path_with_namespace"), "project.path_with_namespace")
    source = object_field(attributes, "source")
    commit = object_field(attributes, "last_commit")
    author = commit.get("author") if isinstance(commit.get("author"), dict) else {}
    user = payload.get("user") if isinstance(payload.get("user"), dict) else {}
    return MergeRequestEvent(
        forge=FORGE,
        delivery_id=delivery_id(headers),
        project=path,
        forge_project_id=validate_project_id(project.get("id"), "project.id"),
        clone_url=validate_clone_url(project.get("git_http_url"), "project.git_http_url"),
        web_url=optional_text(project.get("web_url"), 1024),
        number=iid,
        action=action,
        source_project=validate_project_path(
            source.get("path_with_namespace"), "object_attributes.source.path_with_namespace"
        ),
        source_clone_url=validate_clone_url(
            source.get("git_http_url"), "object_attributes.source.git_http_url"
        ),
        source_branch=validate_ref_name(string_field(attributes, "source_branch",
                                                "object_attributes.source_branch")),
        head_ref=f"refs/merge-requests/{iid}/head",
        commit_sha=validate_sha(commit.get("id"), "object_attributes.last_commit.id"),
        commit_message=optional_text(commit.get("message"), 16000),
        commit_author=optional_text(author.get("name"), 255),
        pusher=optional_text(user.get("username") or user.get("name"), 255),
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
