"""``cicd trigger``: send a real GitLab push webhook for a local repository to a running server.

So the whole path (webhook → task rows → broker → worker clones over HTTP →
build) can be seen without a GitLab. The repository is served read-only over
HTTP by :class:`~cicd.gitserve.GitHttpServer` on 127.0.0.1 while the build
clones it. A folder that is not the top of a git work tree is first
committed as a snapshot into a temporary repository.
"""

from __future__ import annotations

import datetime as dt
import getpass
import re
import secrets
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from cicd.errors import OpsCDError
from cicd.gitserve import GitHttpServer
from cicd.worktree import copy_tree  # the same rule as ``cicd run``

__all__ = ["LocalRepository", "served", "push_payload", "send_push", "project_path"]

ZERO_SHA = "0" * 40
SNAPSHOT_AUTHOR = ("OpsCD trigger", "trigger@opscd.invalid")


@dataclass(frozen=True)
class LocalRepository:
    """A git directory to serve and the commit to build."""

    git_dir: Path
    name: str
    branch: str
    sha: str
    before: str
    message: str
    author_name: str
    author_email: str
    timestamp: str


def _git(path: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(
        ["git", "-C", str(path), *args], capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise OpsCDError(f"git {args[0]} in {path}: {result.stderr.strip()}")
    return result.stdout.strip()


def project_path(name: str) -> str:
    """The project a local folder is built as: ``local/<folder name>``, made a valid path."""
    return "local/" + (re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "project")


def _is_work_tree_top(path: Path) -> bool:
    top = _git(path, "rev-parse", "--show-toplevel", check=False)
    return bool(top) and Path(top).resolve() == path.resolve()


def _snapshot(path: Path, into: Path) -> Path:
    """Commit the folder's files (what git would track, or all) into a new repository."""
    repo = into / path.name
    copy_tree(path, repo)
    name, email = SNAPSHOT_AUTHOR
    identity = ["-c", f"user.name={name}", "-c", f"user.email={email}"]
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, *identity, "commit", "-q", "--allow-empty", "-m", f"Snapshot of {path}")
    return repo


def _describe(repo: Path, name: str) -> LocalRepository:
    sha = _git(repo, "rev-parse", "HEAD")
    fields = _git(repo, "log", "-1", "--format=%an%x00%ae%x00%aI%x00%B", "HEAD").split("\0", 3)
    author_name, author_email, timestamp, message = fields
    return LocalRepository(
        git_dir=Path(_git(repo, "rev-parse", "--absolute-git-dir")),
        name=name,
        branch=_git(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False) or "main",
        sha=sha,
        before=_git(repo, "rev-parse", "HEAD~1", check=False) or ZERO_SHA,
        message=message.strip(),
        author_name=author_name,
        author_email=author_email,
        timestamp=timestamp,
    )


@contextmanager
def served(path: Path) -> Iterator[tuple[LocalRepository, str]]:
    """The repository at ``path`` (or a snapshot of the folder) and its clone URL, while served.

    Only that repository is served, on loopback, under a random path (its folder's
    neighbours are not, and another local user cannot guess the URL): the server's
    root is a private folder holding one link to the git directory.
    """
    path = path.resolve()
    if not path.is_dir():
        raise OpsCDError(f"{path} is not a folder")
    with tempfile.TemporaryDirectory(prefix="opscd-trigger-") as scratch:
        repo = path if _is_work_tree_top(path) else _snapshot(path, Path(scratch))
        local = _describe(repo, path.name)
        root = Path(scratch) / "served"
        root.mkdir(mode=0o700)
        served_as = f"{secrets.token_urlsafe(18)}.git"
        (root / served_as).symlink_to(local.git_dir, target_is_directory=True)
        with GitHttpServer(root) as server:
            yield local, f"{server.base_url}/{served_as}"


def push_payload(local: LocalRepository, clone_url: str) -> dict:
    """A push event body as GitLab sends it (``object_kind: push``)."""
    web_url = clone_url.removesuffix(".git")
    user = getpass.getuser()
    project = {
        "name": local.name,
        "description": "",
        "web_url": web_url,
        "avatar_url": None,
        "git_ssh_url": None,
        "git_http_url": clone_url,
        "namespace": "local",
        "visibility_level": 0,
        "path_with_namespace": project_path(local.name),
        "default_branch": local.branch,
        "homepage": web_url,
        "url": clone_url,
        "ssh_url": None,
        "http_url": clone_url,
    }
    return {
        "object_kind": "push",
        "event_name": "push",
        "before": local.before,
        "after": local.sha,
        "ref": f"refs/heads/{local.branch}",
        "checkout_sha": local.sha,
        "user_id": 0,
        "user_name": user,
        "user_username": user,
        "user_email": local.author_email,
        "project_id": None,
        "project": project,
        "repository": {
            "name": local.name,
            "url": clone_url,
            "description": "",
            "homepage": web_url,
            "git_http_url": clone_url,
            "git_ssh_url": None,
            "visibility_level": 0,
        },
        "commits": [
            {
                "id": local.sha,
                "message": local.message,
                "timestamp": local.timestamp or dt.datetime.now(dt.UTC).isoformat(),
                "url": f"{web_url}/commit/{local.sha}",
                "author": {"name": local.author_name, "email": local.author_email},
                "added": [],
                "modified": [],
                "removed": [],
            }
        ],
        "total_commits_count": 1,
    }


def send_push(api_url: str, secret: str, payload: dict) -> dict:
    """POST the payload as GitLab's ``Push Hook``; return the server's JSON answer."""
    headers = {
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": secret,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
        "User-Agent": "GitLab/17.0.0 (cicd trigger)",
    }
    try:
        response = requests.post(
            f"{api_url.rstrip('/')}/webhooks/gitlab", json=payload, headers=headers, timeout=10
        )
    except requests.RequestException as error:
        raise OpsCDError(f"cannot reach OpsCD at {api_url}: {error}") from None
    body = response.json() if response.headers.get("Content-Type", "").startswith(
        "application/json"
    ) else {"error": response.text}  # fmt: skip
    if response.status_code not in (200, 202):
        raise OpsCDError(f"the webhook answered {response.status_code}: {body.get('error')}")
    return body
