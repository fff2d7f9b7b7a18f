"""Serve git repositories over smart HTTP: ``git http-backend`` behind werkzeug's server.

``cicd trigger`` uses it to let a worker clone a local repository the way it
clones from a forge (over HTTP, exactly the pushed commit); the test suite
uses it as its forge. Read-only: pushing over HTTP is refused by git itself
unless a repository enables ``http.receivepack``, and this server turns that
off. With a user and password, every request must carry them as HTTP Basic
auth (compared in constant time).

werkzeug's threaded server does the HTTP (keep-alive, chunked request
bodies, which git sends for large fetch negotiations); this module only
turns a request into the CGI environment ``git http-backend`` expects and
streams its answer back.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wsgi import get_input_stream

__all__ = ["GitHttpServer"]

log = logging.getLogger(__name__)

_GIT = shutil.which("git") or "git"
_CHUNK = 64 * 1024
#: Largest request body taken (a fetch negotiation of a huge history stays far below).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Request headers ``git http-backend`` reads besides the CGI ones.
FORWARDED_HEADERS = ("HTTP_GIT_PROTOCOL", "HTTP_CONTENT_ENCODING")
# Headers of the backend's answer that are the server's business, not the application's.
_HOP_BY_HOP = {"connection", "keep-alive", "te", "trailers", "transfer-encoding", "upgrade"}

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    """No access log: clones are the caller's business, and they would flood test output."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class GitHttpServer:
    """Serve the repositories under ``root`` over smart HTTP, with HTTP Basic auth if given.

    Subclasses may watch it through :meth:`answered` (each request's status)
    and :meth:`backend_failed` (what ``git http-backend`` wrote to stderr), and
    change what reaches the backend with :meth:`backend_headers`.
    """

    def __init__(
        self, root: Path, username: str | None = None, password: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.username = username
        self.password = password
        self.host = host
        self.port = 0
        self.base_url = ""
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._backend = self._find_backend()

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def _find_backend() -> list[str]:
        exec_path = subprocess.run(
            [_GIT, "--exec-path"], check=True, capture_output=True, text=True
        ).stdout.strip()
        backend = Path(exec_path) / "git-http-backend"
        if backend.is_file() and os.access(backend, os.X_OK):
            return [str(backend)]
        return [_GIT, "http-backend"]

    def start(self) -> Self:
        """Listen on a free port of ``host`` and serve from a thread; returns self."""
        if self._server is not None:
            raise RuntimeError("server already started")
        self.root.mkdir(parents=True, exist_ok=True)
        server = make_server(self.host, 0, self._app, threaded=True, request_handler=_QuietHandler)
        self._server, self.port = server, server.port
        self.base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"git-http-{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()

    def repo_url(self, project_path: str) -> str:
        """Clone URL for ``project_path`` (no credentials in it)."""
        return f"{self.base_url}/{project_path}.git"

    # -- hooks -------------------------------------------------------------------------------

    def answered(self, method: str, path: str, status: int) -> None:
        """Called once per request with the status it got (401s and 404s included)."""

    def backend_failed(self, message: str) -> None:
        """Called with what ``git http-backend`` wrote to stderr for a request."""
        log.warning("git http-backend: %s", message)

    def backend_headers(self, environ: dict[str, Any]) -> dict[str, str]:
        """The request headers passed on to the backend (git's protocol version, encoding)."""
        return {name: environ[name] for name in FORWARDED_HEADERS if environ.get(name)}

    # -- WSGI app ----------------------------------------------------------------------------

    def _authorized(self, environ: dict[str, Any]) -> str | None:
        """Return the authenticated user name (``anonymous`` without auth), or None."""
        if self.username is None:
            return "anonymous"
        scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return None
        user, sep, password = decoded.partition(b":")
        if not sep:
            return None
        # Evaluate both comparisons so timing does not reveal which part was wrong.
        user_ok = hmac.compare_digest(user, self.username.encode())
        password_ok = hmac.compare_digest(password, (self.password or "").encode())
        return self.username if user_ok and password_ok else None

    def _simple(
        self, start_response: StartResponse, request: tuple[str, str], status: int, reason: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> list[bytes]:  # fmt: skip
        self.answered(*request, status)
        body = f"{reason}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        start_response(f"{status} {reason}", headers + (extra or []))
        return [body]

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request = (environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "") or "/")
        user = self._authorized(environ)
        if user is None:
            challenge = [("WWW-Authenticate", 'Basic realm="git"')]
            return self._simple(start_response, request, 401, "Unauthorized", challenge)
        if ".." in request[1]:
            return self._simple(start_response, request, 404, "Not Found")
        # Content-Length or chunked (werkzeug decodes it), never past MAX_BODY_BYTES.
        try:
            body = get_input_stream(environ, max_content_length=MAX_BODY_BYTES).read()
        except RequestEntityTooLarge:
            return self._simple(start_response, request, 413, "Request Entity Too Large")
        except ClientDisconnected:
            return self._simple(start_response, request, 400, "Bad Request")
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            # Read-only whatever the repository says: nobody pushes through this server.
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.receivepack",
            "GIT_CONFIG_VALUE_0": "false",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": environ.get("SERVER_PROTOCOL", "HTTP/1.1"),
            "REMOTE_USER": user,
            "REMOTE_ADDR": environ.get("REMOTE_ADDR", "127.0.0.1"),
            "REQUEST_METHOD": request[0],
            "PATH_INFO": request[1],
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(len(body)),
            **self.backend_headers(environ),
        }
        return self._run_backend(env, body, request, start_response)

    def _run_backend(
        self, env: dict[str, str], body: bytes, request: tuple[str, str],
        start_response: StartResponse,
    ) -> Iterator[bytes]:  # fmt: skip
        """Run ``git http-backend`` as a CGI program and stream its answer."""
        proc = subprocess.Popen(
            self._backend, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        errors: list[bytes] = []

        def feed() -> None:
            try:
                with proc.stdin:
                    proc.stdin.write(body)
            except BrokenPipeError:
                pass

        def drain_stderr() -> None:
            with proc.stderr:
                errors.append(proc.stderr.read())

        helpers = [threading.Thread(target=f, daemon=True) for f in (feed, drain_stderr)]
        for helper in helpers:
            helper.start()

        status, headers = "200 OK", []
        while (line := proc.stdout.readline()) not in (b"", b"\r\n", b"\n"):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() == "status":
                status = value
            elif name.lower() not in _HOP_BY_HOP:
                headers.append((name, value))
        try:
            code = int(status.split(None, 1)[0])
        except (ValueError, IndexError):
            code, status = 502, "502 Bad Gateway"
        self.answered(*request, code)
        start_response(status, headers)

        def stream_body() -> Iterator[bytes]:
            try:
                while block := proc.stdout.read1(_CHUNK):
                    yield block
            finally:
                proc.stdout.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                for helper in helpers:
                    helper.join(timeout=5)
                if message := b"".join(errors).decode("utf-8", "replace").strip():
                    self.backend_failed(message)

        return stream_body()

    def __repr__(self) -> str:
        return f"GitHttpServer(root={self.root!s}, base_url={self.base_url!r})"
