"""A stand-in for Gitea's (and Forgejo's) REST API, commit statuses only, enforcing its rules.

Gitea cannot run on these machines; this speaks the wire format of Gitea's swagger
(``/api/swagger``), under ``/api/v1`` (so :attr:`GiteaAPI.url` is registered as the forge's
URL):

- ``POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`` with a JSON ``CreateStatusOption``
  ``{state, target_url, description, context}`` answers 201 and the created
  ``CommitStatus``: id, ``status`` (Gitea names the state so in its answers, as its
  ``modules/structs/status.go`` does), target_url, description, url, context, creator,
  created_at, updated_at;
- ``GET /api/v1/repos/{owner}/{repo}/statuses/{sha}`` lists them, newest first.

And refuses as Gitea does:

- the token comes as ``Authorization: token <token>``, ``?access_token=`` or ``?token=``;
  an unknown token is 401, a repository it may not see (or none) 404, as Gitea hides
  private repositories;
- a body that is not a JSON object, a ``state`` outside ``pending | success | error |
  failure | warning``, or a sha that is not a commit id is 422 (Gitea's versions differ
  in the code for a bad state; none takes one);
- :meth:`GiteaAPI.fail_next` makes the next POSTs answer an error (500 by default).
"""

from __future__ import annotations

from typing import Any

from .status_api import COMMIT_ID, Call, RepositoryAPI, Request, timestamp

__all__ = ["GiteaAPI", "STATES"]

STATES = ("pending", "success", "error", "failure", "warning")


class GiteaAPI(RepositoryAPI):
    """The stand-in, served from a thread on a free loopback port: ``start()``/``stop()``, or
    a context manager."""

    root = "/api/v1"
    state_key = "status"
    token_parameters = ("access_token", "token")
    content_type = "application/json;charset=utf-8"

    def _route(self, call: Call) -> tuple[str, str] | None:
        # /api/v1/repos/{owner}/{repo}/statuses/{sha}
        parts = call.parts
        if parts[:4] != ["", "api", "v1", "repos"] or len(parts) != 8 or parts[6] != "statuses":
            return None
        return f"{parts[4]}/{parts[5]}", parts[7]

    def _not_found(self) -> Any:
        return _error("The target couldn't be found.")

    def _failed(self, message: str) -> Any:
        return _error(message)

    def _unauthorized(self, request: Request, token: str | None) -> Any:
        return _error("token is required" if token is None else "user does not exist")

    def _refusal(self, sha: str, body: Any) -> tuple[int, Any] | None:
        if not isinstance(body, dict):
            return 422, _error("[]: invalid JSON body")
        if not COMMIT_ID.match(sha):
            return 422, _error(f"sha {sha!r} is not a commit id")
        state = body.get("state")
        if state not in STATES:
            return 422, _error(f"[State]: invalid commit status state {state!r}")
        return None

    def _status(self, status_id: int, url: str, body: dict[str, Any], login: str) -> dict[str, Any]:
        now = timestamp()
        return {
            "id": status_id,
            "status": body["state"],
            "target_url": body.get("target_url") or "",
            "description": body.get("description") or "",
            "url": url,
            "context": body.get("context") or "default",
            "creator": {"id": 1, "login": login, "username": login},
            "created_at": now,
            "updated_at": now,
        }


def _error(message: str) -> dict[str, Any]:
    """Gitea's APIError answer."""
    return {"message": message, "url": "/api/swagger"}
