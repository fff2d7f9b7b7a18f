"""GitLab's recorded webhook payloads (``tests/fixtures/gitlab``), pointed at a test repository,
and the registration a project needs before its webhooks are built."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import uuid
from functools import cache
from pathlib import Path

import requests

__all__ = ["FIXTURES", "gitlab_payload", "gitlab_headers", "register_project", "project_of"]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@cache
def _recorded(name: str) -> dict:
    return json.loads((FIXTURES / "gitlab" / name).read_text())


def gitlab_payload(
    name: str, clone_url: str, project_path: str, ref: str, after: str,
    before: str | None = None,
) -> dict:  # fmt: skip
    """The recorded payload ``name`` with its URLs, project, ref and commit ids replaced."""
    payload = copy.deepcopy(_recorded(name))
    web_url = clone_url.removesuffix(".git")
    for section in ("project", "repository"):
        if section in payload:
            payload[section].update(git_http_url=clone_url, http_url=clone_url, homepage=web_url)
            if section == "project":
                payload[section].update(web_url=web_url, path_with_namespace=project_path)
    # GitLab's id of the project: one per path, as GitLab gives each project its own.
    project_id = forge_project_id(project_path)
    if "project_id" in payload:
        payload["project_id"] = project_id
    if "project" in payload and "id" in payload["project"]:
        payload["project"]["id"] = project_id
    payload["ref"] = ref
    payload["after"] = after
    payload["checkout_sha"] = None if set(after) == {"0"} else after
    if before is not None:
        payload["before"] = before
    if payload.get("commits"):
        payload["commits"][-1]["id"] = after
    return payload


def forge_project_id(project_path: str) -> int:
    """The GitLab project id the tests' payloads give ``project_path`` (stable per path)."""
    return int(hashlib.sha256(project_path.encode()).hexdigest()[:12], 16)


def gitlab_headers(
    token: str | None, event: str = "Push Hook", delivery: str | None = None
) -> dict[str, str]:
    """A delivery's headers; ``delivery=""`` sends no ``X-Gitlab-Event-UUID`` at all."""
    headers = {"Content-Type": "application/json", "X-Gitlab-Event": event}
    if token is not None:
        headers["X-Gitlab-Token"] = token
    if delivery != "":
        headers["X-Gitlab-Event-UUID"] = delivery or str(uuid.uuid4())
    return headers


def project_of(payload: dict) -> tuple[str, str] | None:
    """The project path and clone URL a payload names, if it names a valid one."""
    from cicd.forges import PROJECT_PATH

    project = payload.get("project") if isinstance(payload.get("project"), dict) else {}
    path, url = project.get("path_with_namespace"), project.get("git_http_url")
    if isinstance(path, str) and PROJECT_PATH.match(path) and isinstance(url, str):
        return path, url
    return None


#: The webhook secret of each project the tests registered, by (web URL, project path).
_secrets: dict[tuple[str, str], str] = {}
#: Concurrent deliveries of one new project register it once (a second registration would
#: rotate the secret the first one is sending).
_registering = threading.Lock()


def register_project(
    base: str, project: str, clone_url: str, auth: tuple[str, str] | None = None,
    fresh: bool = False, **fields: str,
) -> str:  # fmt: skip
    """Register ``project`` on the OpsCD at ``base`` through its API (its clone URL updated
    and a new secret made if it is there already); return the webhook secret. Secrets are
    kept per web URL: ``fresh`` makes a new one (another web on the same database may have
    rotated it)."""
    with _registering:
        return _register(base, project, clone_url, auth, fresh, fields)


def _register(
    base: str, project: str, clone_url: str, auth: tuple[str, str] | None, fresh: bool,
    fields: dict[str, str],
) -> str:  # fmt: skip
    known = _secrets.get((base, project))
    if known is not None and not fresh and not fields:
        return known
    api = requests.Session()
    api.auth, api.headers["X-Requested-With"] = auth, "tests"
    body = {"project": project, "clone_url": clone_url, **fields}
    answer = api.post(f"{base}/api/projects", json=body, timeout=10)
    if answer.status_code == 409:
        changed = api.patch(f"{base}/api/projects/{project}", timeout=10,
                            json={k: v for k, v in body.items() if k != "project"})  # fmt: skip
        assert changed.status_code == 200, changed.text
        answer = api.post(f"{base}/api/projects/{project}/rotate-secret", timeout=10)
    assert answer.status_code in (200, 201), answer.text
    secret = answer.json()["webhook_secret"]
    _secrets[(base, project)] = secret
    return secret
