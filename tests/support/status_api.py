"""What the stand-ins for the forges' status APIs share (:mod:`support.gitlab_api`,
:mod:`support.github_api`, :mod:`support.gitea_api`).

:class:`StatusAPI` is the HTTP side: a server on a free loopback port served from a thread,
every request logged, JSON answers, each refusal kept, failures asked for in advance.
:class:`RepositoryAPI` adds what GitHub and Gitea have in common: ``owner/repo``
repositories each with a user's token, statuses kept as the JSON the forge answers, and the
order in which a request is checked. Each forge's module says what is its own: its paths,
its rules and the shapes of its answers.
"""

from __future__ import annotations

import http.server
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qs

__all__ = ["StatusAPI", "RepositoryAPI", "Call", "Request", "COMMIT_ID", "timestamp"]

#: A full commit id, SHA-1 or SHA-256, as the forges take it in a status's path.
COMMIT_ID = re.compile(r"\A(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")

Request = http.server.BaseHTTPRequestHandler


def timestamp() -> str:
    """Now, as the forges write times in their answers."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Call:
    """One request, read."""

    method: str
    #: The path's parts: ``/api/v1/repos?x=1`` is ``["", "api", "v1", "repos"]``.
    parts: list[str]
    #: The query's parameters, each with its values.
    query: dict[str, list[str]]
    raw: bytes
    #: The body parsed as JSON; the raw bytes when it is not JSON, None when there is none.
    body: Any


class StatusAPI:
    """A stand-in, served from a thread on a free loopback port: ``start()``/``stop()``, or a
    context manager. A subclass answers each request in :meth:`_serve`."""

    #: The Content-Type of the answers, as the forge spells it.
    content_type = "application/json"

    def __init__(self) -> None:
        #: (HTTP status, answer, request path) of each refusal
        self.refused: list[tuple[int, str, str]] = []
        #: Every request: method, path, headers, body (parsed JSON when it was JSON).
        self.requests: list[dict[str, Any]] = []
        #: Seconds each request waits before it is answered (a slow forge).
        self.delay = 0.0
        self._failures: list[tuple[int, str | None]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                api._handle(self, "POST")

            def do_GET(self) -> None:
                api._handle(self, "GET")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port: connections are refused from now on."""
        if self._thread is not None:
            self.server.shutdown()
            self._thread = None
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests set up and read ---------------------------------------------------------

    def fail_next(self, times: int, code: int = 500, message: str | None = None) -> None:
        """The next ``times`` POSTs answer ``code`` (with ``message``; else the forge's own
        words for it) whatever they carry."""
        with self._lock:
            self._failures.extend([(code, message)] * times)

    def recover(self) -> None:
        """Answer again from the next request on (the failures asked for are dropped)."""
        with self._lock:
            self._failures.clear()

    def posts(self) -> list[dict[str, Any]]:
        """The POST requests received, in order."""
        return [r for r in self.requests if r["method"] == "POST"]

    # --- the wire ---------------------------------------------------------------------------

    def _handle(self, request: Request, method: str) -> None:
        """Read and log one request, wait :attr:`delay`, and serve it."""
        path, _, query = request.path.partition("?")
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        with self._lock:
            self.requests.append({"method": method, "path": request.path,
                                  "headers": dict(request.headers), "body": body})  # fmt: skip
        if self.delay:
            time.sleep(self.delay)
        self._serve(request, Call(method, path.split("/"), parse_qs(query), raw, body))

    def _serve(self, request: Request, call: Call) -> None:
        raise NotImplementedError

    def _next_failure(self) -> tuple[int, str | None] | None:
        """The failure asked for next, (code, message), taken; None if there is none."""
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def _answer(self, request: Request, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        if code >= 400:
            with self._lock:
                self.refused.append((code, data.decode(), request.path))
        try:
            request.send_response(code)
            request.send_header("Content-Type", self.content_type)
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped waiting (a test of its timeout): no traceback on stderr


class RepositoryAPI(StatusAPI):
    """A forge whose statuses are set on repositories ``owner/repo`` (any case), each with the
    token of a user, as GitHub and Gitea do.

    A request is checked in their order: a path the forge does not serve is 404; a POST
    meets the failures asked for (:meth:`fail_next`); an unknown token is 401, a repository
    the token may not see (or none) 404, as these forges hide private repositories; a GET
    lists the commit's statuses, newest first; a POST must pass the forge's rules
    (:meth:`_refusal`) and is answered 201 with the status it created.
    """

    #: The API's root path: a status created is at ``{root}/repos/{owner}/{repo}/statuses/{sha}``.
    root = ""
    #: The id of the first repository added.
    first_id = 1
    #: Where a status's JSON says its state.
    state_key = "state"
    #: The ``Authorization: <scheme> <token>`` schemes taken (lower case), and the query
    #: parameters that may carry the token instead.
    schemes: tuple[str, ...] = ("token",)
    token_parameters: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.repositories: dict[str, tuple[int, str, str]] = {}  # full_name → (id, token, login)
        #: (full_name, sha) → the statuses posted, oldest first
        self.statuses: dict[tuple[str, str], list[dict[str, Any]]] = {}

    # --- what tests set up and read ---------------------------------------------------------

    def add_repository(self, full_name: str, token: str, login: str = "opscd-bot") -> int:
        """Repository ``owner/repo`` whose statuses ``token`` (user ``login``'s) may set."""
        repo_id = self.first_id + len(self.repositories)
        self.repositories[full_name.lower()] = (repo_id, token, login)
        return repo_id

    def states(self, full_name: str, sha: str, context: str) -> list[str]:
        """The states posted for the commit's status ``context``, oldest first."""
        with self._lock:
            found = self.statuses.get((full_name.lower(), sha), [])
            return [s[self.state_key] for s in found if s["context"] == context]

    def last(self, full_name: str, sha: str, context: str) -> dict[str, Any] | None:
        with self._lock:
            found = self.statuses.get((full_name.lower(), sha), [])
            return next((s for s in reversed(found) if s["context"] == context), None)

    # --- what each forge says ---------------------------------------------------------------

    def _route(self, call: Call) -> tuple[str, str] | None:
        """The repository (``owner/repo``) and the commit a request is for; None for a path
        (or a method on it) the forge does not serve."""
        raise NotImplementedError

    def _not_found(self) -> Any:
        """The answer for a repository the token may not see."""
        raise NotImplementedError

    def _unknown_path(self) -> Any:
        """The answer for a path the forge does not serve."""
        return self._not_found()

    def _failed(self, message: str) -> Any:
        """The answer of a failure asked for (:meth:`fail_next`)."""
        raise NotImplementedError

    def _unauthorized(self, request: Request, token: str | None) -> Any:
        """The answer for a token that is none of the repositories' (None: no token)."""
        raise NotImplementedError

    def _refusal(self, sha: str, body: Any) -> tuple[int, Any] | None:
        """The forge's rules on a status posted: the code and answer that refuse it, or
        None."""
        raise NotImplementedError

    def _status(self, status_id: int, url: str, body: dict[str, Any], login: str) -> dict[str, Any]:
        """The status a POST creates (user ``login``'s, at ``url``), as the forge answers it."""
        raise NotImplementedError

    # --- the wire ---------------------------------------------------------------------------

    def _token(self, request: Request, call: Call) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = value.strip() if scheme.lower() in self.schemes else None
        for name in self.token_parameters:
            token = token or (call.query.get(name) or [None])[0]
        return token

    def _serve(self, request: Request, call: Call) -> None:
        route = self._route(call)
        if route is None:
            return self._answer(request, 404, self._unknown_path())
        if call.method == "POST" and (failure := self._next_failure()) is not None:
            code, message = failure
            return self._answer(request, code, self._failed(message or HTTPStatus(code).phrase))
        full_name, sha = route[0].lower(), route[1]
        token = self._token(request, call)
        if token not in {t for _, t, _ in self.repositories.values()}:
            return self._answer(request, 401, self._unauthorized(request, token))
        repo = self.repositories.get(full_name)
        if repo is None or repo[1] != token:
            return self._answer(request, 404, self._not_found())
        if call.method == "GET":
            with self._lock:
                found = list(reversed(self.statuses.get((full_name, sha), [])))
            return self._answer(request, 200, found)
        refusal = self._refusal(sha, call.body)
        if refusal is not None:
            return self._answer(request, *refusal)
        with self._lock:
            url = f"{self.url}{self.root}/repos/{full_name}/statuses/{sha}"
            status = self._status(next(self._ids), url, call.body, repo[2])
            self.statuses.setdefault((full_name, sha), []).append(status)
        self._answer(request, 201, status)
