"""A stand-in for GitLab's REST API, commit statuses only, enforcing GitLab's rules.

GitLab cannot run on these machines; this speaks the documented wire format of
``POST /api/v4/projects/:id/statuses/:sha`` and ``GET
/api/v4/projects/:id/repository/commits/:sha/statuses`` and answers as GitLab's
``lib/api/commit_statuses.rb`` does, so a test fails where GitLab would refuse:

- ``PRIVATE-TOKEN`` (or ``Authorization: Bearer``) must be the project's token:
  else 401 ``{"message": "401 Unauthorized"}``; an unknown project is 404;
- ``state`` must be one of GitLab's, else 400 ``{"error": "state does not have a
  valid value"}``;
- a status is found by (sha, name, ref) among those still ``pending`` or
  ``running`` (else a new one starts as ``created``) and the state is an event
  of GitLab's state machine: a repeat (pending → pending, running → running) is
  400 ``Cannot transition status via :enqueue from :pending``;
- a request for a commit while another request for the same commit is being
  handled is 409 (GitLab's lock on the commit's pipeline);
- :meth:`GitLabAPI.fail_next` makes the next requests answer 5xx.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from .status_api import Call, Request, StatusAPI

__all__ = ["GitLabAPI", "Status"]

STATES = ("pending", "running", "success", "failed", "canceled", "skipped")
_STOPPABLE = {"created", "waiting_for_resource", "preparing", "pending", "running", "manual",
              "scheduled"}  # fmt: skip
#: GitLab's CommitStatus state machine: event → the states it may leave.
EVENTS = {
    "enqueue": ({"created", "skipped", "manual", "scheduled"}, "pending"),
    "run": ({"pending"}, "running"),
    "success": ({"created", "waiting_for_resource", "preparing", "pending", "running"}, "success"),
    "drop": (_STOPPABLE, "failed"),
    "cancel": (_STOPPABLE, "canceled"),
    "skip": ({"created", "waiting_for_resource", "preparing", "pending"}, "skipped"),
}
#: What each posted state does (``running`` enqueues quietly first, as GitLab does).
ACTIONS = {"pending": ["enqueue!"], "running": ["enqueue", "run!"], "success": ["success!"],
           "failed": ["drop!"], "canceled": ["cancel!"], "skipped": ["skip!"]}  # fmt: skip
#: How long one request holds its commit: concurrent requests for one commit overlap.
HOLD = 0.03


class InvalidTransition(Exception):
    pass


@dataclass
class Status:
    id: int
    sha: str
    ref: str
    name: str
    status: str = "created"
    description: str | None = None
    target_url: str | None = None
    #: Every state this status took, in order.
    states: list[str] = field(default_factory=list)

    def fire(self, action: str) -> None:
        event, strict = action.rstrip("!"), action.endswith("!")
        allowed, target = EVENTS[event]
        if self.status not in allowed:
            if strict:
                raise InvalidTransition(
                    f"Cannot transition status via :{event} from :{self.status} "
                    f'(Reason(s): Status cannot transition via "{event}")'
                )
            return
        self.status = target
        self.states.append(target)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "sha": self.sha, "ref": self.ref, "name": self.name,
                "status": self.status, "description": self.description,
                "target_url": self.target_url, "allow_failure": False,
                "author": {"username": "opscd-bot"}}  # fmt: skip


class GitLabAPI(StatusAPI):
    """The stand-in, served from a thread on a free loopback port (a context manager)."""

    def __init__(self) -> None:
        super().__init__()
        self.projects: dict[str, tuple[int, str]] = {}  # path → (id, token)
        self.statuses: dict[tuple[str, str], list[Status]] = {}  # (path, sha) → statuses
        self._busy: set[tuple[str, str]] = set()

    def add_project(self, path: str, token: str, project_id: int | None = None) -> int:
        """Project ``path`` (GitLab's id ``project_id``) whose statuses ``token`` may set."""
        project_id = project_id or 1000 + len(self.projects)
        self.projects[path] = (project_id, token)
        return project_id

    def fail_next(self, times: int, status: int = 500) -> None:
        """The next ``times`` POSTs with the project's token answer ``status``."""
        super().fail_next(times, status)

    def states(self, path: str, sha: str, name: str) -> list[str]:
        """Every state the commit's status ``name`` took, across its statuses, in order."""
        with self._lock:
            found = [s for s in self.statuses.get((path, sha), []) if s.name == name]
            return [state for status in found for state in status.states]

    def last(self, path: str, sha: str, name: str) -> Status | None:
        with self._lock:
            found = [s for s in self.statuses.get((path, sha), []) if s.name == name]
            return found[-1] if found else None

    # --- the wire -----------------------------------------------------------------------

    def _project(self, raw: str) -> str | None:
        key = unquote(raw)
        for path, (project_id, _) in self.projects.items():
            if key in (path, str(project_id)):
                return path
        return None

    def _serve(self, request: Request, call: Call) -> None:
        parts = call.parts
        # /api/v4/projects/:id/statuses/:sha, /api/v4/projects/:id/repository/commits/:sha/statuses
        post = call.method == "POST" and len(parts) == 7 and parts[5] == "statuses"
        get = call.method == "GET" and len(parts) == 9 and parts[5:7] == ["repository", "commits"]
        if parts[:4] != ["", "api", "v4", "projects"] or not (post or get):
            return self._answer(request, 404, {"message": "404 Not Found"})
        path = self._project(parts[4])
        if path is None:
            return self._answer(request, 404, {"message": "404 Project Not Found"})
        token = request.headers.get("PRIVATE-TOKEN") or request.headers.get(
            "Authorization", ""
        ).removeprefix("Bearer ")
        if token != self.projects[path][1]:
            return self._answer(request, 401, {"message": "401 Unauthorized"})
        sha = parts[6] if post else parts[7]
        failure = self._next_failure() if post else None
        if failure is not None:
            code, _ = failure
            return self._answer(request, code, {"message": f"{code} Internal Server Error"})
        if get:
            with self._lock:
                found = [s.to_json() for s in reversed(self.statuses.get((path, sha), []))]
            return self._answer(request, 200, found)
        with self._lock:
            if (path, sha) in self._busy:
                busy = True
            else:
                busy = False
                self._busy.add((path, sha))
        if busy:
            return self._answer(request, 409, {"message": "409 Conflict"})
        try:
            time.sleep(HOLD)
            code, answer = self._set_status(path, sha, self._params(request, call.raw))
        finally:
            with self._lock:
                self._busy.discard((path, sha))
        self._answer(request, code, answer)

    @staticmethod
    def _params(request: Request, body: bytes) -> dict[str, Any]:
        if request.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(body or b"{}")
        return dict(parse_qsl(body.decode()))

    def _set_status(self, path: str, sha: str, params: dict[str, Any]) -> tuple[int, Any]:
        state = params.get("state")
        if state not in STATES:
            return 400, {"error": "state does not have a valid value"}
        name, ref = params.get("name") or params.get("context") or "default", params.get("ref")
        ref = ref or "main"
        with self._lock:
            commit = self.statuses.setdefault((path, sha), [])
            status = next((s for s in reversed(commit) if s.name == name and s.ref == ref
                           and s.status in ("pending", "running")), None)  # fmt: skip
            if status is None:
                status = Status(next(self._ids), sha, ref, name)
                new = True
            else:
                new = False
            before = (status.status, list(status.states))
            try:
                for action in ACTIONS[state]:
                    status.fire(action)
            except InvalidTransition as error:
                status.status, status.states = before
                return 400, {"message": str(error)}
            status.description = params.get("description", status.description)
            status.target_url = params.get("target_url", status.target_url)
            if new:
                commit.append(status)
            return 201, status.to_json()
