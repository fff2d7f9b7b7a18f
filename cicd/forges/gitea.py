"""Gitea and Forgejo: deliveries signed with ``X-Gitea-Signature`` (Forgejo: also
``X-Forgejo-Signature``), push and pull request events parsed, and commit statuses posted.

Payload format: https://docs.gitea.com/usage/webhooks (GitHub's shapes, with Gitea's own
fields: ``pusher.login``, the ``synchronized`` action). Gitea sends ``X-Gitea-Event``
(``push``, ``pull_request``…), ``X-Gitea-Event-Type`` (finer: ``pull_request_sync``),
``X-Gitea-Delivery`` and ``X-Gitea-Signature: <hex HMAC SHA-256 of the body>``; Forgejo
sends the same headers and ``X-Forgejo-Event``, ``X-Forgejo-Delivery`` and
``X-Forgejo-Signature`` besides; either is read.

Statuses: Gitea's ``POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`` (its swagger's
``CreateStatusOption``: state, target_url, description, context), with ``requests``
directly: no Gitea client library is well kept, and this is one request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from cicd.forges import (
    Ignored,
    MergeRequestEvent,
    PushEvent,
    StatusError,
    hmac_sha256_matches,
)
from cicd.forges.payloads import (
    cut,
    delivery_header,
    full_name,
    github_style_pull_request,
    github_style_push,
    header,
    load_json,
    scrub,
    status_request,
)

__all__ = ["FORGE", "delivery_id", "signature_matches", "repository", "parse", "api_base",
           "post_status"]  # fmt: skip

FORGE = "gitea"
#: Pull request actions that bring a head commit to build (``synchronized``: new commits on
#: the head branch; Gitea's spelling, GitHub's is ``synchronize``).
PR_ACTIONS = ("opened", "reopened", "synchronized")
#: Where Gitea (``login``) and Forgejo's older versions (``username``) name a user.
LOGINS = ("login", "username")
#: OpsCD's states → Gitea's (``pending | success | error | failure | warning``).
STATES = {"pending": "pending", "running": "pending", "success": "success",
          "failed": "failure", "canceled": "error"}  # fmt: skip
#: Gitea stores longer descriptions, but its pages show one line: 255 is plenty.
MAX_DESCRIPTION = 255
#: X-Gitea-Event-Type → event, when only the finer header came.
_EVENT_TYPES = {"push": "push", "pull_request": "pull_request", "pull_request_sync": "pull_request"}


def delivery_id(headers: Mapping[str, str]) -> str | None:
    """The id Gitea keeps when a delivery is redelivered (``X-Gitea-Delivery``, Forgejo's
    ``X-Forgejo-Delivery``), or the client's ``Idempotency-Key``."""
    return delivery_header(headers, "X-Gitea-Delivery", "X-Forgejo-Delivery", "Idempotency-Key")


def signature_matches(headers: Mapping[str, str], body: bytes, secret: str) -> bool:
    """Whether ``X-Gitea-Signature`` (or Forgejo's ``X-Forgejo-Signature``) is the hex HMAC
    SHA-256 of the raw ``body`` under the webhook ``secret``."""
    value = header(headers, "X-Gitea-Signature") or header(headers, "X-Forgejo-Signature")
    return hmac_sha256_matches(secret, body, value)


def repository(headers: Mapping[str, str], body: bytes) -> str | None:
    """The ``repository.full_name`` of any delivery (a create, a delete…), to find the
    registration whose secret signs it; None if the body has none. Raises nothing: the
    body is not yet known to come from Gitea."""
    return full_name(body)


def parse(headers: Mapping[str, str], body: bytes) -> PushEvent | MergeRequestEvent | Ignored:
    """Turn one delivery into a build to run, or the reason it builds nothing.

    Raises :class:`PayloadError` when the body is not JSON or lacks what the event must
    carry; the message names the field.
    """
    event = header(headers, "X-Gitea-Event") or header(headers, "X-Forgejo-Event")
    if not event:
        kind = header(headers, "X-Gitea-Event-Type") or header(headers, "X-Forgejo-Event-Type")
        event = _EVENT_TYPES.get(kind or "", kind or "")
    if event not in ("push", "pull_request"):
        return Ignored(f"event {event or '(no X-Gitea-Event header)'!r} does not start builds")
    payload = load_json(body, "Gitea")
    if event == "push":
        return github_style_push(FORGE, delivery_id(headers), payload, LOGINS)
    return github_style_pull_request(FORGE, delivery_id(headers), payload, PR_ACTIONS, LOGINS)


def api_base(api_url: str) -> str:
    """The REST API's root for a Gitea or Forgejo registered by its address:
    ``{api_url}/api/v1``. Raises :class:`ValueError` for anything but an http(s) URL."""
    parts = urlsplit(api_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Gitea URL {api_url!r} is not an http:// or https:// URL")
    base = api_url.strip().rstrip("/")
    return base if base.endswith("/api/v1") else f"{base}/api/v1"


def post_status(
    api_url: str, token: str, project: int | str, sha: str, *, state: str, ref: str, name: str,
    description: str, target_url: str | None, timeout: float,
) -> None:  # fmt: skip
    """Set commit ``sha``'s status ``name`` (Gitea's "context") to OpsCD's ``state`` (pending,
    running, success, failed, canceled) as the token's user, in one POST; ``project`` is the
    repository's ``owner/repo``. ``ref`` is not part of Gitea's API.

    Raises :class:`StatusError`, ``retry`` for no answer, 408, 409, 429 and 5xx; never with
    the token in its message.
    """
    import requests  # here, as the other forges' clients: only the reporter posts statuses

    base = status_request("Gitea", STATES, api_base, api_url, token, project, state, sha)
    owner, repo = (quote(part, safe="") for part in project.split("/"))
    fields = {"state": STATES[state], "description": cut(description or "", MAX_DESCRIPTION),
              "context": name}  # fmt: skip
    if target_url:
        fields["target_url"] = target_url
    headers = {"Authorization": f"token {token}", "Accept": "application/json",
               "User-Agent": "OpsCD"}  # fmt: skip
    try:  # no redirects: requests would turn the POST into a GET and report success
        answer = requests.post(f"{base}/repos/{owner}/{repo}/statuses/{sha}", json=fields,
                               headers=headers, timeout=timeout, allow_redirects=False)  # fmt: skip
    except requests.RequestException as error:
        raise StatusError(f"Gitea did not answer: {type(error).__name__}", retry=True) from None
    code = answer.status_code
    if 200 <= code < 300:
        return
    if 300 <= code < 400:
        where = scrub(answer.headers.get("Location", "elsewhere"), token)[:300]
        raise StatusError(f"Gitea answered {code}, redirecting to {where}: register the forge's "
                          "URL as it answers", retry=False)  # fmt: skip
    retry = code in (408, 409, 429) or code >= 500
    raise StatusError(f"Gitea answered {code}: {scrub(_message(answer), token)}", retry=retry)


# --- helpers --------------------------------------------------------------------------------


def _message(answer: Any) -> str:
    """Gitea's error answer, ``{"message": …, "url": …}``, or the start of a proxy's page."""
    try:
        data = answer.json()
    except ValueError:
        return answer.text[:200] or answer.reason or "no message"
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])[:500]
    return json.dumps(data)[:300]
