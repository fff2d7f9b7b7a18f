"""A real git server over HTTP with Basic auth, its repositories, and git without user config.

``GitHttpServer`` is OpsCD's own (:mod:`cicd.gitserve`: every repository under a root
directory through ``git http-backend``, on ``127.0.0.1`` with a random port) with what the
tests observe of it. Every request must carry HTTP Basic credentials; pushing over HTTP is
disabled, so tests can clone and fetch but not push.

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
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from cicd import gitserve

__all__ = ["GitHttpServer", "GitRepo", "git_env"]

TEST_AUTHOR_NAME = "Test User"
TEST_AUTHOR_EMAIL = "test@example.com"

_GIT = shutil.which("git") or "git"


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


class GitHttpServer(gitserve.GitHttpServer):
    """OpsCD's git server with what tests look at and one knob.

    ``requests_seen`` records ``(method, PATH_INFO, status)`` for every request (401s and
    404s included); ``auth_failures`` counts the 401 answers (missing *or* wrong
    credentials — git's first request has no credentials when they come from a credential
    helper or the URL, so that flow produces one 401 before succeeding); ``backend_errors``
    collects what ``git http-backend`` wrote to stderr. ``protocol_v2 = False`` makes the
    server speak protocol v0 only, like an old or strict forge.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests_seen: list[tuple[str, str, int]] = []
        self.auth_failures = 0
        self.backend_errors: list[str] = []
        self.protocol_v2 = True
        self._lock = threading.Lock()

    def answered(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests_seen.append((method, path, status))
            self.auth_failures += status == 401

    def backend_failed(self, message: str) -> None:
        with self._lock:
            self.backend_errors.append(message)

    def backend_headers(self, environ: dict[str, Any]) -> dict[str, str]:
        headers = super().backend_headers(environ)
        if not self.protocol_v2:  # an old server: protocol v0, no fetch of unadvertised commits
            headers.pop("HTTP_GIT_PROTOCOL", None)
        return headers

    @property
    def auth_header(self) -> str:
        """``Authorization: Basic ...`` header line for the server's credentials."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Authorization: Basic {token}"


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
