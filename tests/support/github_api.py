"""A stand-in for GitHub's REST API, commit statuses only, enforcing GitHub's rules.

GitHub cannot be reached from these machines; this speaks the wire format documented at
https://docs.github.com/en/rest/commits/statuses, as a GitHub Enterprise Server serves it
(under ``/api/v3``, so :attr:`GitHubAPI.url` is registered as the forge's URL):

- ``POST /api/v3/repos/{owner}/{repo}/statuses/{sha}`` with a JSON body ``{state,
  target_url, description, context}`` answers 201 and the created status (id, node_id,
  state, description, target_url, context, created_at, updated_at, url, creator);
- ``GET /api/v3/repos/{owner}/{repo}/commits/{sha}/statuses`` lists them, newest first.

And refuses as GitHub does:

- ``Authorization: Bearer <token>`` or ``token <token>`` must be a known token, else 401
  ``{"message": "Bad credentials", "documentation_url": …}`` (``"Requires
  authentication"`` when there is none); a repository the token may not see, or none,
  is 404 ``{"message": "Not Found"}``, as GitHub hides private repositories;
- a body that is not JSON is 400 ``Problems parsing JSON``;
- ``state`` outside ``error | failure | pending | success``, a description over 140
  characters, or a sha that is not a commit id is 422 ``{"message": "Validation Failed",
  "errors": [...]}`` (a sha: ``No commit found for SHA: …``);
- :meth:`GitHubAPI.fail_next` makes the next POSTs answer an error (500 by default; a 403
  with ``message="API rate limit exceeded…"`` is GitHub's rate limit).
"""

from __future__ import annotations

from typing import Any

from .status_api import COMMIT_ID, Call, RepositoryAPI, Request, timestamp

__all__ = ["GitHubAPI", "STATES"]

STATES = ("error", "failure", "pending", "success")
MAX_DESCRIPTION = 140
DOCS = "https://docs.github.com/rest/commits/statuses#create-a-commit-status"
REST_DOCS = "https://docs.github.com/rest"


class GitHubAPI(RepositoryAPI):
    """The stand-in, served from a thread on a free loopback port: ``start()``/``stop()``, or
    a context manager."""

    root = "/api/v3"
    first_id = 1000
    schemes = ("bearer", "token")
    content_type = "application/json; charset=utf-8"

    def _route(self, call: Call) -> tuple[str, str] | None:
        # /api/v3/repos/{owner}/{repo}/statuses/{sha}, .../commits/{sha}/statuses
        parts = call.parts
        post = call.method == "POST" and len(parts) == 8 and parts[6] == "statuses"
        get = (call.method == "GET" and len(parts) == 9 and parts[6] == "commits"
               and parts[8] == "statuses")  # fmt: skip
        if parts[:4] != ["", "api", "v3", "repos"] or not (post or get):
            return None
        return f"{parts[4]}/{parts[5]}", parts[7]

    def _unknown_path(self) -> Any:
        return {"message": "Not Found", "documentation_url": REST_DOCS}

    def _not_found(self) -> Any:
        return {"message": "Not Found", "documentation_url": DOCS}

    def _failed(self, message: str) -> Any:
        return {"message": message}

    def _unauthorized(self, request: Request, token: str | None) -> Any:
        if not request.headers.get("Authorization"):
            return {"message": "Requires authentication", "documentation_url": DOCS}
        return {"message": "Bad credentials", "documentation_url": REST_DOCS}

    def _refusal(self, sha: str, body: Any) -> tuple[int, Any] | None:
        if not isinstance(body, dict):
            return 400, {"message": "Problems parsing JSON", "documentation_url": DOCS}
        if not COMMIT_ID.match(sha):
            return 422, {"message": f"No commit found for SHA: {sha}", "documentation_url": DOCS}
        errors = []
        if body.get("state") not in STATES:
            errors.append({"resource": "Status", "code": "custom", "field": "state",
                           "message": "state is not included in the list"})  # fmt: skip
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            errors.append({"resource": "Status", "code": "invalid", "field": "description"})
        elif description and len(description) > MAX_DESCRIPTION:
            errors.append({"resource": "Status", "code": "custom", "field": "description",
                           "message": "description is too long (maximum is "
                                      f"{MAX_DESCRIPTION} characters)"})  # fmt: skip
        if errors:
            return 422, {"message": "Validation Failed", "errors": errors,
                         "documentation_url": DOCS}  # fmt: skip
        return None

    def _status(self, status_id: int, url: str, body: dict[str, Any], login: str) -> dict[str, Any]:
        now = timestamp()
        return {
            "url": url,
            "avatar_url": None,
            "id": status_id,
            "node_id": f"SC_{status_id:08d}",
            "state": body["state"],
            "description": body.get("description"),
            "target_url": body.get("target_url"),
            "context": body.get("context") or "default",
            "created_at": now,
            "updated_at": now,
            "creator": {"login": login, "id": 1, "type": "User"},
        }
