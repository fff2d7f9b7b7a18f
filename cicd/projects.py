"""Registered projects: the server's record of which repositories it builds, and how.

A webhook only says that a registered project changed; what the project is,
where it is cloned from, which secret its webhooks carry and which refs are
protected come from here, never from a payload. This module validates and
stores registrations; the API and ``cicd projects`` are its interfaces.

A project is ``group/app``; a namespace ``group/*`` covers a GitLab group
webhook, its ``clone_url`` a prefix that each project's path completes. Each
registration gets a generated webhook secret, shown once and kept only as its
SHA-256 (it is 32 random bytes: a fast hash is enough, and it is compared in
constant time). Its own git credentials, if given, are encrypted with
``CICD_SECRETS_KEY``; without them builds clone with the instance's
``CICD_GIT_*``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets as random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from cicd import db
from cicd.errors import OpsCDError
from cicd.models import Project, utcnow
from cicd.secrets import encrypt

__all__ = [
    "ProjectError", "Registered", "PATH", "register", "update", "rotate_secret", "remove",
    "get", "list_projects", "secret_matches", "parse_patterns", "patterns",
]  # fmt: skip

#: A GitLab project or namespace path: segments of letters, digits, ``_.-``, not starting
#: with ``-`` or ``.``; a namespace registration ends in ``/*``.
SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}"
PATH = re.compile(rf"\A{SEGMENT}(?:/{SEGMENT}){{0,19}}(?:/\*)?\Z")
#: One ref pattern (fnmatch): what a branch or tag name may hold, plus ``*?[]``.
PATTERN = re.compile(r"\A[A-Za-z0-9_./*?\[\]+-]{1,255}\Z")


class ProjectError(OpsCDError):
    """A registration is invalid, missing, or already there; the message says which."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Registered:
    """A project just registered (or its secret rotated): the secret is shown this once."""

    project: Project
    webhook_secret: str


def _check_path(path: str) -> str:
    if not PATH.match(path) or ".." in path:
        raise ProjectError(
            f"project path {path!r} must look like group/app (or group/* for a namespace): "
            "letters, digits, '_', '.', '-' in each part"
        )
    return path


def _check_clone_url(url: str, namespace: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProjectError(f"clone URL {url!r} must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise ProjectError(
            "the clone URL must not hold credentials: give them with --git-username and "
            "--git-password-stdin (stored encrypted)"
        )
    if parts.query or parts.fragment:
        raise ProjectError(f"clone URL {url!r} must have no query or fragment")
    if namespace and not url.endswith("/"):
        raise ProjectError(
            f"a namespace's clone URL is a prefix ending in '/', e.g. {url.rstrip('/')}/ "
            "(each project's clone URL is the prefix, its path and .git)"
        )
    return url


def parse_patterns(text: str | list[str] | None, what: str) -> str:
    """Comma-separated ref patterns, checked; stored as ``a,b``."""
    items = text if isinstance(text, list) else (text or "").split(",")
    patterns = [item.strip() for item in items if item.strip()]
    for pattern in patterns:
        if not PATTERN.match(pattern):
            raise ProjectError(f"{what} pattern {pattern!r} is not a ref pattern such as release/*")
    return ",".join(patterns)


def _new_secret() -> tuple[str, str]:
    secret = random.token_urlsafe(32)
    return secret, hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(project: Project, token: str | None) -> bool:
    """Whether ``token`` is this project's webhook secret (constant time)."""
    if not token:
        return False
    digest = hashlib.sha256(token.encode()).hexdigest()
    return hmac.compare_digest(digest, project.webhook_secret_sha256)


def register(
    path: str, clone_url: str, *, protected: str | list[str] | None = "main",
    approval: str | list[str] | None = "", git_username: str | None = None,
    git_password: str | None = None, key: SecretStr | None = None,
) -> Registered:  # fmt: skip
    """Record a new project (or namespace); its generated webhook secret is returned once."""
    _check_path(path)
    _check_clone_url(clone_url, path.endswith("/*"))
    if (git_username is None) != (git_password is None):
        raise ProjectError("give both --git-username and a password, or neither")
    secret, digest = _new_secret()
    project = Project(
        path=path, clone_url=clone_url, webhook_secret_sha256=digest,
        protected_refs=parse_patterns(protected, "protected"),
        approval_refs=parse_patterns(approval, "approval"), git_username=git_username,
        git_password_ciphertext=encrypt(git_password, key) if git_password else None,
    )  # fmt: skip
    with db.session() as session:
        session.add(project)
        try:
            session.commit()
        except IntegrityError:  # the unique path: registered already (or just now)
            raise ProjectError(f"project {path} is registered already", status=409) from None
    return Registered(project, secret)


def get(path: str) -> Project:
    with db.session() as session:
        project = session.scalar(select(Project).where(Project.path == path))
    if project is None:
        raise ProjectError(f"project {path} is not registered", status=404)
    return project


def list_projects() -> list[Project]:
    with db.session() as session:
        return list(session.scalars(select(Project).order_by(Project.path)))


def update(path: str, changes: dict[str, Any], key: SecretStr | None = None) -> Project:
    """Change the clone URL, the ref patterns or the git credentials of a registration."""
    allowed = {"clone_url", "protected", "approval", "git_username", "git_password"}
    unknown = set(changes) - allowed
    if unknown:
        raise ProjectError(f"cannot change {', '.join(sorted(unknown))}; "
                           f"one of {', '.join(sorted(allowed))}")  # fmt: skip
    with db.session() as session:
        project = session.scalar(select(Project).where(Project.path == path).with_for_update())
        if project is None:
            raise ProjectError(f"project {path} is not registered", status=404)
        if "clone_url" in changes:
            project.clone_url = _check_clone_url(str(changes["clone_url"]), path.endswith("/*"))
        if "protected" in changes:
            project.protected_refs = parse_patterns(changes["protected"], "protected")
        if "approval" in changes:
            project.approval_refs = parse_patterns(changes["approval"], "approval")
        if "git_username" in changes or "git_password" in changes:
            username, password = changes.get("git_username"), changes.get("git_password")
            if (username is None) != (password is None):
                raise ProjectError("give both git_username and git_password, or both null")
            project.git_username = username
            project.git_password_ciphertext = encrypt(password, key) if password else None
        project.updated_at = utcnow()
        session.commit()
    return project


def rotate_secret(path: str) -> Registered:
    """A new webhook secret for the project (the old one stops working at once)."""
    secret, digest = _new_secret()
    with db.session() as session:
        project = session.scalar(select(Project).where(Project.path == path).with_for_update())
        if project is None:
            raise ProjectError(f"project {path} is not registered", status=404)
        project.webhook_secret_sha256, project.updated_at = digest, utcnow()
        session.commit()
    return Registered(project, secret)


def remove(path: str) -> None:
    with db.session() as session:
        removed = session.execute(delete(Project).where(Project.path == path)).rowcount
        session.commit()
    if not removed:
        raise ProjectError(f"project {path} is not registered", status=404)


def patterns(stored: str) -> list[str]:
    """A stored ``a,b`` of ref patterns as a list."""
    return [pattern for pattern in stored.split(",") if pattern]
