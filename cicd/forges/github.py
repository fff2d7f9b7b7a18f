"""GitHub (and GitHub Enterprise Server): deliveries signed with ``X-Hub-Signature-256``, push
and pull request events parsed, and commit statuses posted.

Payload format: https://docs.github.com/en/webhooks/webhook-events-and-payloads (``push``,
for branches and tags alike, and ``pull_request``); deliveries carry ``X-GitHub-Event``,
``X-GitHub-Delivery`` and ``X-Hub-Signature-256: sha256=<HMAC SHA-256 of the body>``
(https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries). The
SHA-1 ``X-Hub-Signature`` GitHub still sends is not accepted.

Statuses: https://docs.github.com/en/rest/commits/statuses (``POST
/repos/{owner}/{repo}/statuses/{sha}``), through PyGithub, on ``api.github.com`` for
github.com and ``/api/v3`` for an Enterprise Server (:func:`api_base`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from urllib.parse import urlsplit

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

FORGE = "github"
#: Pull request actions that bring a head commit to build: ``synchronize`` is new commits
#: pushed to the head branch. ``closed``, ``edited``, ``labeled``… build nothing.
PR_ACTIONS = ("opened", "reopened", "synchronize")
#: OpsCD's states → GitHub's (``error | failure | pending | success``): GitHub has no
#: "running", and a canceled build is an error, not a failure of the code.
STATES = {"pending": "pending", "running": "pending", "success": "success",
          "failed": "failure", "canceled": "error"}  # fmt: skip
#: GitHub refuses longer descriptions (422 "description is too long (maximum is 140
#: characters)").
MAX_DESCRIPTION = 140


def delivery_id(headers: Mapping[str, str]) -> str | None:
    """The id GitHub keeps when a delivery is redelivered (``X-GitHub-Delivery``), or the
    client's ``Idempotency-Key``."""
    return delivery_header(headers, "X-GitHub-Delivery", "Idempotency-Key")


def signature_matches(headers: Mapping[str, str], body: bytes, secret: str) -> bool:
    """Whether ``X-Hub-Signature-256`` is ``sha256=`` and the HMAC SHA-256 of the raw ``body``
    under the webhook ``secret``. A delivery signed only with SHA-1 does not match."""
    value = (header(headers, "X-Hub-Signature-256") or "").strip()
    if not value.startswith("sha256="):
        return False
    return hmac_sha256_matches(secret, body, value.removeprefix("sha256="))


def repository(headers: Mapping[str, str], body: bytes) -> str | None:
    """The ``repository.full_name`` of any delivery (a ping, a create…), to find the
    registration whose secret signs it; None if the body has none. Raises nothing: the
    body is not yet known to come from GitHub."""
    return full_name(body)


def parse(headers: Mapping[str, str], body: bytes) -> PushEvent | MergeRequestEvent | Ignored:
    """Turn one delivery into a build to run, or the reason it builds nothing.

    Raises :class:`PayloadError` when the body is not JSON or lacks what the event must
    carry; the message names the field.
    """
    event = header(headers, "X-GitHub-Event") or ""
    if event == "ping":
        return Ignored("ping")
    if event not in ("push", "pull_request"):
        return Ignored(f"event {event or '(no X-GitHub-Event header)'!r} does not start builds")
    payload = load_json(body, "GitHub")
    if event == "push":
        return github_style_push(FORGE, delivery_id(headers), payload, ("name",))
    return github_style_pull_request(FORGE, delivery_id(headers), payload, PR_ACTIONS, ("login",))


def api_base(api_url: str) -> str:
    """The REST API's root for a GitHub registered by its address: ``https://api.github.com``
    for github.com, ``{api_url}/api/v3`` for a GitHub Enterprise Server. Raises
    :class:`ValueError` for anything but an http(s) URL."""
    parts = urlsplit(api_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"GitHub URL {api_url!r} is not an http:// or https:// URL")
    if parts.hostname.lower() in ("github.com", "www.github.com", "api.github.com"):
        return "https://api.github.com"
    base = api_url.strip().rstrip("/")
    return base if base.endswith("/api/v3") else f"{base}/api/v3"


def post_status(
    api_url: str, token: str, project: int | str, sha: str, *, state: str, ref: str, name: str,
    description: str, target_url: str | None, timeout: float,
) -> None:  # fmt: skip
    """Set commit ``sha``'s status ``name`` (GitHub's "context") to OpsCD's ``state`` (pending,
    running, success, failed, canceled) as the token's user, in one POST; ``project`` is the
    repository's ``owner/repo``. ``ref`` is not part of GitHub's API.

    Raises :class:`StatusError`, ``retry`` for no answer, 408, 409, 429, 5xx and GitHub's
    rate limits (a 403 saying so); never with the token in its message.
    """
    base = status_request("GitHub", STATES, api_base, api_url, token, project, state, sha)

    import github  # here: PyGithub costs 0.1-0.2 s to import, and only the
    import requests  # reporter posts statuses
    from github.GithubException import RateLimitExceededException

    class Bearer(github.Auth.Token):
        """A personal access token as GitHub's REST documentation sends it (PyGithub's own
        says ``token``), with the media type it asks for."""

        @property
        def token_type(self) -> str:
            return "Bearer"

        def authentication(self, headers: dict) -> None:
            super().authentication(headers)
            headers["Accept"] = "application/vnd.github+json"

    fields = {"state": STATES[state], "description": cut(description or "", MAX_DESCRIPTION),
              "context": name}  # fmt: skip
    if target_url:
        fields["target_url"] = target_url
    # No retries and no throttling inside: the outbox backs off and keeps the states' order.
    # PyGithub takes whole seconds only. lazy: get_repo and get_commit send nothing, so the
    # status is one POST (the commit's sha is read from its URL).
    client = github.Github(
        base_url=base, auth=Bearer(token), timeout=max(1, math.ceil(timeout)), retry=None,
        user_agent="OpsCD", seconds_between_requests=None, seconds_between_writes=None,
        lazy=True,
    )  # fmt: skip
    try:
        client.get_repo(project).get_commit(sha).create_status(**fields)
    except github.GithubException as error:
        code = error.status
        message = scrub(_message(error.data), token)
        retry = (code in (408, 409, 429) or code >= 500
                 or isinstance(error, RateLimitExceededException))  # fmt: skip
        raise StatusError(f"GitHub answered {code}: {message}", retry=retry) from None
    except requests.RequestException as error:
        raise StatusError(f"GitHub did not answer: {type(error).__name__}", retry=True) from None
    except RuntimeError as error:  # PyGithub's refusal to follow a redirect to another host
        raise StatusError(f"GitHub API at {base}: {scrub(str(error), token)}"[:500],
                          retry=False) from None  # fmt: skip
    finally:
        client.close()


# --- helpers --------------------------------------------------------------------------------


def _message(data: object) -> str:
    """GitHub's error answer, ``{"message": …, "errors": [...]}``, as one line."""
    if not isinstance(data, dict):
        return str(data)[:300]
    message = str(data.get("message") or data.get("data") or "no message")
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        details = [e.get("message") or e.get("code") if isinstance(e, dict) else e for e in errors]
        message += " (" + "; ".join(str(d) for d in details) + ")"
    return message[:500]
