"""What the forge modules share to read deliveries: headers whatever their case, JSON bodies,
fields that must be there, and the push and pull request shapes GitHub and Gitea share.

GitHub's payloads are Gitea's model (Gitea adds ``login``/``username`` spellings and its
own action names), so :func:`github_style_push` and :func:`github_style_pull_request`
read both; each forge module passes what differs. Everything here raises
:class:`~cicd.errors.PayloadError` with the field's name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from cicd.errors import PayloadError
from cicd.forges import (
    Ignored,
    MergeRequestEvent,
    PushEvent,
    StatusError,
    validate_clone_url,
    validate_project_id,
    validate_project_path,
    validate_ref_name,
    validate_sha,
)

__all__ = [
    "header", "delivery_header", "load_json", "string_field", "object_field", "optional_text",
    "positive_number", "commit_of", "full_name", "cut", "scrub", "github_style_push",
    "github_style_pull_request", "OWNER_REPO", "COMMIT_ID", "status_request",
]  # fmt: skip

_PREFIXES = {"refs/heads/": "branch", "refs/tags/": "tag"}
#: ``owner/repo`` as GitHub and Gitea spell repositories: nothing that could leave a URL path.
OWNER_REPO = re.compile(r"\A[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+\Z")
COMMIT_ID = re.compile(r"\A(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")


def header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]``, whatever its case (Flask's headers are case-insensitive, a dict
    built by hand may not be)."""
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def delivery_header(headers: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` the delivery has (the forge's delivery id, then the client's
    ``Idempotency-Key``), checked to be an id."""
    value = next((v for v in (header(headers, n) for n in names) if v is not None), None)
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 128 or not value.isprintable():
        raise PayloadError(f"{' / '.join(names)} must be 1 to 128 printable chars")
    return value


def load_json(body: bytes, forge: str) -> dict[str, Any]:
    """The delivery's body as a JSON object; ``forge`` names it in messages."""
    if body.startswith(b"payload="):
        raise PayloadError("body is form-encoded: set the webhook's content type to "
                           "application/json")  # fmt: skip
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PayloadError(f"body is not valid JSON: {error}") from None
    except RecursionError:
        raise PayloadError(f"body is nested too deeply to be a {forge} event") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise PayloadError(f"body is not a {forge} event: {error}") from None
    if not isinstance(payload, dict):
        raise PayloadError("body must be a JSON object")
    return payload


def string_field(data: dict[str, Any], key: str, name: str | None = None) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"field {name or key!r} is missing or not a non-empty string")
    return value


def object_field(data: dict[str, Any], key: str, name: str | None = None) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise PayloadError(f"field {name or key!r} is missing or not an object")
    return value


def optional_text(value: object, limit: int) -> str | None:
    """A free-text field (a message, a name) if it is text, cut to ``limit``."""
    return value[:limit] if isinstance(value, str) else None


def _maybe(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _first_text(data: dict[str, Any], keys: tuple[str, ...], limit: int = 255) -> str | None:
    return next((optional_text(data[k], limit) for k in keys if isinstance(data.get(k), str)),
                None)  # fmt: skip


def positive_number(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        raise PayloadError(f"field {field!r} is missing or not a positive integer")
    return value


def commit_of(payload: dict[str, Any], sha: str) -> dict[str, Any]:
    """The pushed commit's entry in ``commits``; tag pushes and big pushes may lack it."""
    commits = payload.get("commits")
    if not isinstance(commits, list):
        return {}
    return next((c for c in commits if isinstance(c, dict) and c.get("id") == sha), {})


def full_name(body: bytes) -> str | None:
    """The ``repository.full_name`` of any GitHub-shaped delivery (a ping, a create…), to
    find the registration whose secret signs it; None if it has none. Raises nothing: the
    body is not yet known to come from the forge."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        return None
    repo = payload.get("repository") if isinstance(payload, dict) else None
    name = repo.get("full_name") if isinstance(repo, dict) else None
    return name if isinstance(name, str) and name else None


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def scrub(text: str, token: str) -> str:
    """The text without the token, should a server ever echo it."""
    return text.replace(token, "[token]") if token else text


def status_request(
    forge: str, states: Mapping[str, str], api_base: Callable[[str], str], api_url: str,
    token: str, project: object, state: str, sha: str,
) -> str:  # fmt: skip
    """Check a status for a GitHub-style API (``owner/repo`` paths) before anything is sent,
    and return the API's root; a request it could never take is a :class:`StatusError`
    that is not tried again."""
    if state not in states:
        raise StatusError(f"OpsCD state {state!r} has no {forge} state", retry=False)
    if not token:
        raise StatusError(f"no {forge} API token to post statuses with", retry=False)
    if not isinstance(project, str) or not OWNER_REPO.match(project) or ".." in project:
        raise StatusError(f"{forge} repository {project!r} is not owner/repo", retry=False)
    if not COMMIT_ID.match(sha):
        raise StatusError(f"commit {sha[:80]!r} is not a commit id", retry=False)
    try:
        return api_base(api_url)
    except ValueError as error:
        raise StatusError(str(error), retry=False) from None


def _repository(repo: dict[str, Any]) -> dict[str, Any]:
    """The delivering repository's fields of an event, checked."""
    return {
        "project": validate_project_path(repo.get("full_name"), "repository.full_name"),
        "forge_project_id": validate_project_id(repo.get("id"), "repository.id"),
        "clone_url": validate_clone_url(repo.get("clone_url"), "repository.clone_url"),
        "web_url": optional_text(repo.get("html_url"), 1024),
    }


def github_style_push(
    forge: str, delivery: str | None, payload: dict[str, Any], login_keys: tuple[str, ...]
) -> PushEvent | Ignored:
    """A push of a branch or a tag (both come as ``push``); ``login_keys``: where the
    forge puts the pusher's name."""
    ref = string_field(payload, "ref")
    prefix = next((p for p in _PREFIXES if ref.startswith(p)), None)
    if prefix is None:
        return Ignored(f"ref {ref[:300]!r} is neither a branch nor a tag")
    ref_type, name = _PREFIXES[prefix], ref[len(prefix) :]
    after = string_field(payload, "after")
    if payload.get("deleted") is True or not after.strip("0"):
        return Ignored(f"{ref_type} {name[:255]!r} was deleted")
    ref_name = validate_ref_name(name)
    head = _maybe(payload, "head_commit")
    # An annotated tag's "after" is the tag object; head_commit is the commit it tags.
    tagged = head.get("id") if ref_type == "tag" and COMMIT_ID.match(str(head.get("id"))) else None
    sha = validate_sha(tagged or after, "after")
    commit = commit_of(payload, sha) or head
    repo = object_field(payload, "repository")
    before = payload.get("before")
    return PushEvent(
        forge=forge,
        delivery_id=delivery,
        **_repository(repo),
        ref_type=ref_type,
        ref_name=ref_name,
        commit_sha=sha,
        before_sha=before if isinstance(before, str) and len(before) <= 64 else None,
        commit_message=optional_text(commit.get("message"), 16000),
        commit_author=optional_text(_maybe(commit, "author").get("name"), 255),
        pusher=_first_text(_maybe(payload, "pusher"), login_keys),
    )


def github_style_pull_request(
    forge: str, delivery: str | None, payload: dict[str, Any], actions: tuple[str, ...],
    login_keys: tuple[str, ...],
) -> MergeRequestEvent | Ignored:  # fmt: skip
    """A pull request opened, reopened or given new commits (``actions``, as the forge spells
    them), delivered by the base repository's webhook; the head may be a fork."""
    action = payload.get("action")
    if action not in actions:
        return Ignored(f"pull request action {str(action)[:64]!r} does not start builds")
    repo = object_field(payload, "repository")
    pull = object_field(payload, "pull_request")
    number = positive_number(payload.get("number", pull.get("number")), "number")
    head = object_field(pull, "head", "pull_request.head")
    source = head.get("repo")
    if source is None:  # the forge's answer when the fork was deleted
        return Ignored(f"pull request #{number}'s head repository no longer exists")
    if not isinstance(source, dict):
        raise PayloadError("field 'pull_request.head.repo' is not an object")
    return MergeRequestEvent(
        forge=forge,
        delivery_id=delivery,
        **_repository(repo),
        number=number,
        action=action,
        source_project=validate_project_path(
            source.get("full_name"), "pull_request.head.repo.full_name"
        ),
        source_clone_url=validate_clone_url(
            source.get("clone_url"), "pull_request.head.repo.clone_url"
        ),
        source_branch=validate_ref_name(string_field(head, "ref", "pull_request.head.ref")),
        head_ref=f"refs/pull/{number}/head",
        commit_sha=validate_sha(head.get("sha"), "pull_request.head.sha"),
        commit_message=None,  # a pull request event carries no commit message
        commit_author=_first_text(_maybe(pull, "user"), login_keys),
        pusher=_first_text(_maybe(payload, "sender"), login_keys),
    )
