"""A real git server over HTTP with Basic auth, for tests.

``GitHttpServer`` serves every repository under a root directory through ``git http-backend``
(run as a CGI program from a small threaded WSGI app) on ``127.0.0.1`` with a random port.
Every request must carry HTTP Basic credentials; pushing over HTTP is disabled per repository,
so tests can clone and fetch but not push.

``GitRepo`` creates bare repositories under that root and writes to them directly on disk
(commit in a private work tree, push by local path), never through HTTP.

Typical use::

    with GitHttpServer(tmp_path / "srv", "ci-bot", "s3cret") as server:
        repo = GitRepo.create(server.root, "group/project")
        sha = repo.commit({"README.md": "hello\\n"})
        url = server.repo_url("group/project")  # http://127.0.0.1:PORT/group/project.git

All git processes started here get an isolated configuration (no system or global config),
so they behave the same whatever the developer's ``~/.gitconfig`` says.
"""

from __future__ import annotations

import base64
import hmac
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["GitHttpServer", "GitRepo", "git_env"]

TEST_AUTHOR_NAME = "Test User"
TEST_AUTHOR_EMAIL = "test@example.com"

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


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a git process that ignores the user's and the system's git config."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": tempfile.gettempdir(),
        "LANG": "C",
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "",
        "GIT_AUTHOR_NAME": TEST_AUTHOR_NAME,
        "GIT_AUTHOR_EMAIL": TEST_AUTHOR_EMAIL,
        "GIT_COMMITTER_NAME": TEST_AUTHOR_NAME,
        "GIT_COMMITTER_EMAIL": TEST_AUTHOR_EMAIL,
    }
    if extra:
        env.update(extra)
    return env


def _git(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run git with an argument list; return stripped stdout (CalledProcessError on failure)."""
    proc = subprocess.run(
        [_GIT, *(os.fspath(a) for a in args)],
        cwd=cwd,
        env=git_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip()


# --------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------


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
    """Serve the repositories under ``root`` over smart HTTP, requiring HTTP Basic auth.

    ``requests_seen`` records ``(method, PATH_INFO, status)`` for every request (including 401s
    and 404s); ``auth_failures`` counts the 401 answers (missing *or* wrong credentials — note
    that git's first request has no credentials when they come from a credential helper or the
    URL, so that flow produces one 401 before succeeding). ``backend_errors`` collects whatever
    ``git http-backend`` wrote to stderr, for debugging failing tests.
    """

    def __init__(self, root: Path, username: str, password: str) -> None:
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
            "127.0.0.1",
            0,
            self._app,
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self._server = server
        self.port = server.server_port
        self.base_url = f"http://127.0.0.1:{self.port}"
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

    # -- helpers for tests -------------------------------------------------------------------

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
        """Return the authenticated user name, or None."""
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
        password_ok = hmac.compare_digest(password, self.password.encode())
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
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stderr_parts: list[bytes] = []

        def feed() -> None:
            assert proc.stdin is not None
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
            assert proc.stderr is not None
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
            assert proc.stdout is not None
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


# --------------------------------------------------------------------------------------------
# Repositories
# --------------------------------------------------------------------------------------------


class GitRepo:
    """A bare repository under a server root, written to directly on disk.

    Commits are made in a private work tree (``root/_work/<project_path>``) and pushed to the
    bare repository (``root/<project_path>.git``) by local path.
    """

    def __init__(self, root: Path, project_path: str, default_branch: str = "main") -> None:
        self.root = Path(root)
        self.project_path = project_path
        self.default_branch = default_branch
        self.bare_path = self.root / f"{project_path}.git"
        self.work_path = self.root / "_work" / project_path

    @classmethod
    def create(cls, root: Path, project_path: str, default_branch: str = "main") -> GitRepo:
        project_path = project_path.strip("/")
        if not project_path or ".." in project_path.split("/"):
            raise ValueError(f"bad project path {project_path!r}")
        repo = cls(root, project_path, default_branch)
        if repo.bare_path.exists():
            raise FileExistsError(repo.bare_path)
        repo.bare_path.mkdir(parents=True)
        _git("init", "--quiet", "--bare", f"--initial-branch={default_branch}", repo.bare_path)
        _git("-C", repo.bare_path, "config", "http.receivepack", "false")
        repo.work_path.mkdir(parents=True, exist_ok=True)
        _git("init", "--quiet", f"--initial-branch={default_branch}", repo.work_path)
        _git("-C", repo.work_path, "config", "core.fileMode", "true")
        return repo

    def _work(self, *args: str) -> str:
        return _git("-C", self.work_path, *args)

    def _current_branch(self) -> str | None:
        try:
            return self._work("symbolic-ref", "--quiet", "--short", "HEAD")
        except subprocess.CalledProcessError:
            return None  # detached

    def _local_branch_exists(self, name: str) -> bool:
        try:
            self._work("rev-parse", "--verify", "--quiet", f"refs/heads/{name}")
        except subprocess.CalledProcessError:
            return False
        return True

    def _checkout(self, branch: str) -> None:
        if self._current_branch() == branch:
            return
        if self._local_branch_exists(branch):
            self._work("checkout", "--quiet", branch)
        else:
            # New branch from the current HEAD (works on an unborn HEAD too).
            self._work("checkout", "--quiet", "-b", branch)

    def _push(self, refspec: str) -> None:
        self._work("push", "--quiet", "--force", str(self.bare_path), refspec)

    def commit(
        self,
        files: dict[str, str | bytes],
        message: str = "change",
        branch: str | None = None,
        executable: set[str] | frozenset[str] = frozenset(),
        delete: set[str] | frozenset[str] = frozenset(),
    ) -> str:
        """Write ``files``, delete ``delete``, commit on ``branch`` and push; return the sha.

        A new branch starts from the work tree's current HEAD (the branch last committed to).
        An empty change still makes a (new) commit.
        """
        branch = branch or self.default_branch
        self._checkout(branch)
        work = self.work_path.resolve()
        for rel in delete:
            target = self._inside(work, rel)
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for rel, content in files.items():
            target = self._inside(work, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            target.write_bytes(data)
            target.chmod(0o755 if rel in executable else 0o644)
        for rel in executable:
            if rel not in files:
                self._inside(work, rel).chmod(0o755)
        self._work("add", "--all")
        self._work("commit", "--quiet", "--allow-empty", "--no-verify", "-m", message)
        self._push(f"refs/heads/{branch}:refs/heads/{branch}")
        return self._work("rev-parse", "HEAD")

    @staticmethod
    def _inside(work: Path, rel: str) -> Path:
        target = (work / rel).resolve()
        if target == work or work not in target.parents or ".git" in target.relative_to(work).parts:
            raise ValueError(f"path {rel!r} escapes the work tree")
        return target

    def tag(self, name: str, sha: str | None = None) -> str:
        """Create (or move) lightweight tag ``name`` at ``sha`` (default: work tree HEAD), push it,
        and return the commit sha it points at."""
        self._work("tag", "--force", name, sha or "HEAD")
        self._push(f"refs/tags/{name}:refs/tags/{name}")
        return self._work("rev-parse", f"refs/tags/{name}^{{commit}}")

    def delete_branch(self, name: str) -> None:
        """Delete branch ``name`` from the bare repository (and the work tree)."""
        _git("-C", self.bare_path, "update-ref", "-d", f"refs/heads/{name}")
        if self._local_branch_exists(name):
            if self._current_branch() == name:
                self._work("checkout", "--quiet", "--detach")
            self._work("branch", "--quiet", "-D", name)

    def head(self, branch: str | None = None) -> str:
        """Sha of ``branch`` (default: the default branch) in the bare repository."""
        ref = f"refs/heads/{branch or self.default_branch}"
        return _git("-C", self.bare_path, "rev-parse", "--verify", f"{ref}^{{commit}}")

    def __repr__(self) -> str:
        return f"GitRepo({self.bare_path!s})"
