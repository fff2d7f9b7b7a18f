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

import fnmatch
import hashlib
import hmac
import re
import secrets as random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from sqlalchemy import bindparam, delete, func, select
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cicd import db
from cicd.errors import OpsCDError
from cicd.forges import FORGES, FORK_MRS, PROJECT_PATH, SEGMENT, SIGNING_FORGES
from cicd.models import Project, utcnow
from cicd.secrets import decrypt, encrypt

__all__ = [
    "ProjectError", "Registered", "PATH", "register", "update", "rotate_secret", "remove",
    "get", "list_projects", "secret_matches", "parse_patterns", "patterns", "PROJECT_PATH",
    "governing", "clone_url_of", "same_url", "matches", "is_protected", "main_branch",
    "needs_approval", "git_credentials", "record_forge_id", "any_secret_matches", "webhook_secret",
]  # fmt: skip

#: A registration's path: a project's (:data:`~cicd.forges.PROJECT_PATH`), or a namespace's
#: ending in ``/*``.
PATH = re.compile(rf"\A(?:{SEGMENT}/){{0,19}}{SEGMENT}(?:/\*)?\Z")
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
    if len(path) > 255 or not PATH.match(path):
        raise ProjectError(
            f"project path {path!r} must look like group/app (or group/* for a namespace): "
            "each part letters and digits, joined by single '.', '_' or '-'"
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


def _check_api_url(url: str | None) -> str | None:
    """The forge's base URL (``https://gitlab.example.com``); ``/api/v4`` is OpsCD's to add."""
    if url is None or url == "":
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProjectError(f"API URL {url!r} must be an http:// or https:// URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ProjectError(f"API URL {url!r} must have no credentials, query or fragment "
                           "(give the token with --api-token-stdin)")  # fmt: skip
    if parts.path.rstrip("/").endswith("/api/v4"):
        raise ProjectError(f"API URL {url!r}: give the forge's base URL, without /api/v4")
    if len(url) > 1024:
        raise ProjectError("the API URL is longer than 1024 characters")
    return url.rstrip("/")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ProjectError(f"{what} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _check_api_token(token: object) -> str:
    if not isinstance(token, str) or not token.strip() or not token.strip().isprintable():
        raise ProjectError("the API token must be one line of printable characters")
    return token.strip()


def register(
    path: str, clone_url: str, *, protected: str | list[str] | None = "main",
    approval: str | list[str] | None = "", git_username: str | None = None,
    git_password: str | None = None, key: SecretStr | None = None,
    api_url: str | None = None, api_token: str | None = None, forge: str = "gitlab",
    fork_mrs: str = "off",
) -> Registered:  # fmt: skip
    """Record a new project (or namespace); its generated webhook secret is returned once.

    With ``api_token`` (a forge access token that may set commit statuses) its
    builds report their states to the forge at ``api_url`` (default: the clone
    URL's origin); the token is encrypted like the git password. On a forge that signs its
    deliveries the webhook secret is kept encrypted too (the signature needs it).
    """
    _check_choice(forge, FORGES, "the forge")
    _check_choice(fork_mrs, FORK_MRS, "fork merge requests (--fork-mrs)")
    _check_path(path)
    _check_clone_url(clone_url, path.endswith("/*"))
    api_url = _check_api_url(api_url)
    if api_token is not None:
        api_token = _check_api_token(api_token)
    if (git_username is None) != (git_password is None):
        raise ProjectError("give both --git-username and a password, or neither")
    secret, digest = _new_secret()
    project = Project(
        path=path, forge=forge, fork_mrs=fork_mrs, clone_url=clone_url,
        webhook_secret_sha256=digest,
        webhook_secret_ciphertext=encrypt(secret, key) if forge in SIGNING_FORGES else None,
        protected_refs=parse_patterns(protected, "protected"),
        approval_refs=parse_patterns(approval, "approval"), git_username=git_username,
        git_password_ciphertext=encrypt(git_password, key) if git_password else None,
        api_url=api_url, api_token_ciphertext=encrypt(api_token, key) if api_token else None,
    )  # fmt: skip
    with db.session() as session:
        same = session.scalar(select(Project.path).where(func.lower(Project.path) == path.lower()))
        if same is not None:
            raise ProjectError(f"project {path} is registered already (as {same})", status=409)
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
    """Change the clone URL, the ref patterns, the git credentials or the forge API URL and
    token of a registration (a null ``api_token``: no more statuses)."""
    allowed = {"clone_url", "protected", "approval", "git_username", "git_password", "api_url",
               "api_token", "fork_mrs"}  # fmt: skip
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
        if "fork_mrs" in changes:
            project.fork_mrs = _check_choice(str(changes["fork_mrs"]), FORK_MRS,
                                             "fork merge requests (fork_mrs)")  # fmt: skip
        if "api_url" in changes:
            project.api_url = _check_api_url(changes["api_url"])
        if "api_token" in changes:
            token = changes["api_token"]
            project.api_token_ciphertext = (
                None if token is None else encrypt(_check_api_token(token), key)
            )
        project.updated_at = utcnow()
        session.commit()
    return project


def rotate_secret(path: str, key: SecretStr | None = None) -> Registered:
    """A new webhook secret for the project (the old one stops working at once)."""
    secret, digest = _new_secret()
    with db.session() as session:
        project = session.scalar(select(Project).where(Project.path == path).with_for_update())
        if project is None:
            raise ProjectError(f"project {path} is not registered", status=404)
        project.webhook_secret_sha256, project.updated_at = digest, utcnow()
        if project.forge in SIGNING_FORGES:
            project.webhook_secret_ciphertext = encrypt(secret, key)
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


# --- what the webhook and the stages ask of a registration -----------------------------------


#: :func:`governing`'s query, built once: every webhook delivery runs it, and building it
#: costs more CPU than running it.
_GOVERNING = select(Project).where(Project.path.in_(bindparam("candidates", expanding=True)))


def governing(session: Session, path: str) -> Project | None:
    """The registration that covers project ``path``: its own, else the nearest namespace's
    (``group/sub/*``, then ``group/*``)."""
    if not PROJECT_PATH.match(path):
        return None
    parts = path.split("/")
    candidates = [path] + ["/".join(parts[:n]) + "/*" for n in range(len(parts) - 1, 0, -1)]
    rows = session.scalars(_GOVERNING, {"candidates": candidates})
    found = {row.path: row for row in rows}
    return next((found[c] for c in candidates if c in found), None)


def clone_url_of(registration: Project, path: str) -> str:
    """Where project ``path`` is cloned from: its registered URL, or the namespace's prefix
    plus the project's path and ``.git``."""
    if registration.path.endswith("/*"):
        return f"{registration.clone_url}{path}.git"
    return registration.clone_url


def _normalised(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number
        port = -1
    path = parts.path.rstrip("/").removesuffix(".git").rstrip("/")
    return parts.scheme.lower(), (parts.hostname or "").lower(), port, path


def same_url(url: str, registered: str) -> bool:
    """Whether two clone URLs name one repository: scheme, host and port compared without
    case or default ports, paths with or without a trailing ``/`` or ``.git``."""
    return _normalised(url) == _normalised(registered)


def matches(stored: str, ref_type: str, ref_name: str) -> bool:
    """Whether a ref is one of the stored patterns. A pattern names branches (``main``,
    ``release/*``); one that starts with ``refs/`` is matched against the full ref, so
    ``refs/tags/v*`` names tags. A tag never matches a branch pattern."""
    full = ("refs/heads/" if ref_type == "branch" else "refs/tags/") + ref_name
    for pattern in patterns(stored):
        if pattern.startswith("refs/"):
            if fnmatch.fnmatchcase(full, pattern):
                return True
        elif ref_type == "branch" and fnmatch.fnmatchcase(ref_name, pattern):
            return True
    return False


def is_protected(registration: Project, ref_type: str, ref_name: str) -> bool:
    """Builds of protected refs get the project's secret variables and may overwrite images."""
    return matches(registration.protected_refs, ref_type, ref_name)


def main_branch(registration: Project) -> str | None:
    """The project's main branch: its first protected pattern that names one branch
    (``main`` of ``main,release/*``), or None."""
    for pattern in patterns(registration.protected_refs):
        if not pattern.startswith("refs/") and not any(c in pattern for c in "*?["):
            return pattern
    return None


def needs_approval(registration: Project, ref_type: str, ref_name: str) -> bool:
    """The server's approval rule; a pushed ci.yaml may add one, never remove it."""
    return matches(registration.approval_refs, ref_type, ref_name)


def webhook_secret(registration: Project, key: SecretStr | None) -> str | None:
    """The webhook secret itself, for forges that sign deliveries with it (None elsewhere)."""
    if registration.webhook_secret_ciphertext is None:
        return None
    return decrypt(registration.webhook_secret_ciphertext, key)


def git_credentials(registration: Project, key: SecretStr | None) -> tuple[str, str] | None:
    """The registration's own git user and password, if it has them."""
    if registration.git_username is None or registration.git_password_ciphertext is None:
        return None
    return registration.git_username, decrypt(registration.git_password_ciphertext, key)


def record_forge_id(session: Session, registration: Project, forge_project_id: int) -> None:
    """Remember the forge's id of a project from its first authenticated webhook."""
    session.execute(
        sql_update(Project)
        .where(Project.id == registration.id, Project.forge_project_id.is_(None))
        .values(forge_project_id=forge_project_id)
    )


def any_secret_matches(session: Session, token: str | None) -> bool:
    """Whether ``token`` is some GitLab registration's webhook secret (looked up by its SHA-256:
    the secrets are random, so the digest reveals nothing and needs no constant time)."""
    if not token:
        return False
    digest = hashlib.sha256(token.encode()).hexdigest()
    match = select(Project.id).where(Project.webhook_secret_sha256 == digest,
                                     Project.forge == "gitlab")  # fmt: skip
    return session.scalar(match) is not None
