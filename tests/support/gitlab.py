"""GitLab's recorded webhook payloads (``tests/fixtures/gitlab``), pointed at a test repository."""

from __future__ import annotations

import copy
import json
import uuid
from functools import cache
from pathlib import Path

__all__ = ["FIXTURES", "gitlab_payload", "gitlab_headers"]

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
    payload["ref"] = ref
    payload["after"] = after
    payload["checkout_sha"] = None if set(after) == {"0"} else after
    if before is not None:
        payload["before"] = before
    if payload.get("commits"):
        payload["commits"][-1]["id"] = after
    return payload


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
