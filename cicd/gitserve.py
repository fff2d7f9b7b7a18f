"""Serve git repositories over smart HTTP: ``git http-backend`` behind a small threaded WSGI server.

``cicd trigger`` uses it to let a worker clone a local repository the way it
clones from a forge (over HTTP, exactly the pushed commit); the test suite
uses it as its forge. Read-only: pushing over HTTP is refused by git itself
unless a repository enables ``http.receivepack``. With a user and password,
every request must carry them as HTTP Basic auth (compared in constant time).
"""

from __future__ import annotations

import base64
import hmac
import os
import shutil
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["GitHttpServer"]

_GIT = shutil.which("git") or "git"
_CHUNK = 64 * 1024
# Headers a WSGI application must not set (wsgiref asserts on them).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}

StartResponse = Callable[..., Any]


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response (e.g. git aborting after a 401) is not a test failure.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return
        super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ChunkedBodyError(Exception):
    pass


def _read_exact(stream: IO[bytes], length: int) -> bytes:
    parts: list[bytes] = []
    remaining = length
    while remaining > 0:
        block = stream.read(min(remaining, _CHUNK))
        if not block:
            raise _ChunkedBodyError("request body shorter than Content-Length")
        parts.append(block)
        remaining -= len(block)
    return b"".join(parts)


def _read_chunked(stream: IO[bytes]) -> bytes:
    """Decode a ``Transfer-Encoding: chunked`` request body (wsgiref passes it through raw)."""
    parts: list[bytes] = []
    while True:
        line = stream.readline(65537)
        if not line:
            raise _ChunkedBodyError("unexpected end of chunked body")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise _ChunkedBodyError(f"bad chunk size line {line!r}") from exc
        if size == 0:
            break
        parts.append(_read_exact(stream, size))
        if stream.readline(65537) not in (b"\r\n", b"\n"):
            raise _ChunkedBodyError("missing CRLF after chunk")
    # Skip trailers up to the terminating blank line.
    while True:
        line = stream.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
    return b"".join(parts)


class GitHttpServer:
    """Serve the repositories under ``root`` over smart HTTP, with HTTP Basic auth if given.

    ``requests_seen`` records ``(method, PATH_INFO, status)`` for every request (including 401s
    and 404s); ``auth_failures`` counts the 401 answers (missing *or* wrong credentials — note
    that git's first request has no credentials when they come from a credential helper or the
    URL, so that flow produces one 401 before succeeding). ``backend_errors`` collects whatever
    ``git http-backend`` wrote to stderr, for debugging failing tests.
    """

    def __init__(
        self, root: Path, username: str | None = None, password: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.username = username
        self.password = password
        self.requests_seen: list[tuple[str, str, int]] = []
        #: False makes the server speak protocol v0 only, like an old or strict forge.
        self.protocol_v2 = True
        self.auth_failures = 0
        self.backend_errors: list[str] = []
        self.port = 0
        self.base_url = ""
        self._lock = threading.Lock()
        self._server: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.host = host
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
        if self._server is not None:
            raise RuntimeError("server already started")
        self.root.mkdir(parents=True, exist_ok=True)
        server = make_server(
            self.host,
            0,
            self._app,
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self._server = server
        self.port = server.server_port
        self.base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"git-http-{self.port}",
            daemon=True,
        )
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
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------------

    def repo_url(self, project_path: str) -> str:
        """Clone URL for ``project_path`` (no credentials in it)."""
        return f"{self.base_url}/{project_path}.git"

    @property
    def auth_header(self) -> str:
        """``Authorization: Basic ...`` header line for the server's credentials."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Authorization: Basic {token}"

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests_seen.append((method, path, status))
            if status == 401:
                self.auth_failures += 1

    # -- WSGI app ----------------------------------------------------------------------------

    def _authorized(self, environ: dict[str, Any]) -> str | None:
        """Return the authenticated user name (``anonymous`` without auth), or None."""
        if self.username is None:
            return "anonymous"
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = header.partition(" ")
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
        if user_ok and password_ok:
            return self.username
        return None

    def _simple(
        self,
        start_response: StartResponse,
        method: str,
        path: str,
        status: int,
        reason: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> list[bytes]:
        self._record(method, path, status)
        body = f"{reason}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        start_response(f"{status} {reason}", headers + (extra or []))
        return [body]

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"

        user = self._authorized(environ)
        if user is None:
            return self._simple(
                start_response,
                method,
                path,
                401,
                "Unauthorized",
                [("WWW-Authenticate", 'Basic realm="git"')],
            )
        if ".." in path:
            return self._simple(start_response, method, path, 404, "Not Found")

        content_length = environ.get("CONTENT_LENGTH", "") or ""
        stream: IO[bytes] = environ["wsgi.input"]
        try:
            if content_length.strip():
                body = _read_exact(stream, int(content_length))
            elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
                body = _read_chunked(stream)
            else:
                body = b""
        except (ValueError, _ChunkedBodyError):
            return self._simple(start_response, method, path, 400, "Bad Request")

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
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(len(body)),
        }
        for header in ("HTTP_GIT_PROTOCOL", "HTTP_CONTENT_ENCODING"):
            if header == "HTTP_GIT_PROTOCOL" and not self.protocol_v2:
                continue  # an old server: protocol v0, no fetch of unadvertised commits
            if environ.get(header):
                env[header] = environ[header]

        proc = subprocess.Popen(
            self._backend,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stderr_parts: list[bytes] = []

        def feed() -> None:
            try:
                proc.stdin.write(body)
            except BrokenPipeError:
                pass
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass

        def drain_stderr() -> None:
            with proc.stderr:
                stderr_parts.append(proc.stderr.read())

        helpers = [
            threading.Thread(target=feed, daemon=True),
            threading.Thread(target=drain_stderr, daemon=True),
        ]
        for helper in helpers:
            helper.start()

        status = "200 OK"
        headers: list[tuple[str, str]] = []
        while True:
            line = proc.stdout.readline()
            if not line or line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() == "status":
                status = value
            elif name.lower() not in _HOP_BY_HOP:
                headers.append((name, value))

        try:
            code = int(status.split(None, 1)[0])
        except (ValueError, IndexError):
            code = 502
            status = "502 Bad Gateway"
        self._record(method, path, code)
        start_response(status, headers)

        def stream_body() -> Iterator[bytes]:
            try:
                while True:
                    block = proc.stdout.read1(_CHUNK)
                    if not block:
                        break
                    yield block
            finally:
                proc.stdout.close()
                if proc.poll() is None:
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                for helper in helpers:
                    helper.join(timeout=5)
                message = b"".join(stderr_parts).decode("utf-8", "replace").strip()
                if message:
                    with self._lock:
                        self.backend_errors.append(message)

        return stream_body()

    def __repr__(self) -> str:
        return f"GitHttpServer(root={self.root!s}, base_url={self.base_url!r})"
