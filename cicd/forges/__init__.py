"""Forges: one module per forge turns a delivery into a PushEvent, a MergeRequestEvent or an
Ignored, and posts commit statuses to the forge's API.

Each forge module has the same parts: ``FORGE`` (its name), ``parse(headers, body)``,
``delivery_id(headers)``, how a delivery is authenticated (GitLab: ``token(headers)``,
a shared secret sent as is; GitHub and Gitea: ``signature_matches(headers, body,
secret)``, an HMAC SHA-256 of the raw body), and ``post_status(...)`` taking OpsCD's
states (pending, running, success, failed, canceled) and mapping them to the forge's.

Forge modules parse, validate and speak the forge's HTTP API; they never touch
the database or the broker (that is :mod:`cicd.web.webhook` and :mod:`cicd.statuses`).
Everything in a payload comes from outside, so fields that later reach git, paths
or image names are validated here.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import re
from dataclasses import asdict, dataclass
from types import ModuleType

from cicd.errors import OpsCDError, PayloadError

__all__ = [
    "PushEvent", "MergeRequestEvent", "Ignored", "hmac_sha256_matches", "PROJECT_PATH",
    "validate_ref_name", "validate_sha",
    "validate_clone_url", "validate_project_path", "validate_project_id", "skips_ci",
    "StatusError", "StatusRefused", "FORGES", "TITLES", "SIGNING_FORGES", "FORK_MRS",
    "module",
]  # fmt: skip

#: The forges a project may be on (each a module here); those that sign each delivery with
#: the webhook secret (HMAC SHA-256) rather than send the secret as is.
FORGES = ("gitlab", "github", "gitea")
#: How each forge is named in messages.
TITLES = {"gitlab": "GitLab", "github": "GitHub", "gitea": "Gitea"}
SIGNING_FORGES = ("github", "gitea")
#: What a merge request from a fork that is not registered gets (the target project's
#: choice): no build, or one without secrets that publishes nothing.
FORK_MRS = ("off", "no-secrets")


def module(forge: str) -> ModuleType:
    """The module of one of :data:`FORGES` (imported when first asked for: the reporter needs
    only its projects' forges' clients)."""
    if forge not in FORGES:
        raise KeyError(f"no forge {forge!r}; one of {', '.join(FORGES)}")
    return importlib.import_module(f"{__name__}.{forge}")


#: What GitLab (and GitHub, Gitea, Woodpecker) read in a commit message as "build nothing",
#: in any capitalization.
_SKIP_CI = re.compile(r"\[(?:skip ci|ci skip)\]", re.IGNORECASE)


def skips_ci(message: str | None) -> bool:
    """Whether the pushed commit's message asks for no build (``[skip ci]`` or ``[ci skip]``)."""
    return bool(message) and _SKIP_CI.search(message) is not None


#: One part of a GitLab path, as GitLab allows it today: letters and digits, parts of them
#: joined by one ``.`` or ``_``, ``__``, or dashes; it starts and ends with a letter or digit.
#: Lower-cased, that is an image repository component as it is, so project → image
#: repository is one-to-one (registrations that differ only in case are refused, as GitLab
#: refuses such projects).
SEGMENT = r"[A-Za-z0-9]+(?:(?:[._]|__|-+)[A-Za-z0-9]+)*"
#: A project's path, ``group/sub/app``.
PROJECT_PATH = re.compile(rf"\A(?:{SEGMENT}/){{0,19}}{SEGMENT}\Z")


@dataclass(frozen=True)
class _Delivery:
    """What every delivery that builds says of the project it comes from."""

    forge: str
    delivery_id: str | None
    project: str
    #: The forge's own id of the project (stable across renames), if the payload has one.
    forge_project_id: int | None
    clone_url: str
    web_url: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PushEvent(_Delivery):
    """A push that should be built: the exact commit of one branch or tag of one project."""

    ref_type: str  # "branch" or "tag"
    ref_name: str  # full name after refs/heads/ or refs/tags/, slashes kept
    commit_sha: str
    before_sha: str | None
    commit_message: str | None
    commit_author: str | None
    pusher: str | None


@dataclass(frozen=True)
class MergeRequestEvent(_Delivery):
    """A merge request (GitHub, Gitea: pull request) opened, reopened or given new commits:
    build its head commit.

    ``project`` is the *target* project, whose webhook delivered the event and whose
    registration authenticates it; the commits come from ``source_project`` (the same one,
    or a fork). ``head_ref`` is the target repository's own ref of the head commit
    (``refs/merge-requests/N/head``, ``refs/pull/N/head``), which the forge keeps for
    forks too.
    """

    #: GitLab's iid, GitHub's and Gitea's pull request number.
    number: int
    action: str
    source_project: str
    source_clone_url: str
    source_branch: str
    head_ref: str
    commit_sha: str
    commit_message: str | None
    commit_author: str | None
    pusher: str | None


@dataclass(frozen=True)
class Ignored:
    """A delivery that is valid but builds nothing; ``reason`` is sent back to the forge."""

    reason: str


class StatusError(OpsCDError):
    """The forge did not take a commit status; ``retry``: it may on a later try (a conflict,
    a server error, no answer), else it never will as sent (a wrong token, no such project)."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class StatusRefused(OpsCDError):
    """The forge has this state already and refuses it again (GitLab's "Cannot transition
    status …"): the status is where it should be, nothing to try again."""


def hmac_sha256_matches(secret: str, body: bytes, signature: str | None) -> bool:
    """Whether ``signature`` (hex) is the HMAC SHA-256 of ``body`` under ``secret``, compared
    in constant time (GitHub's ``X-Hub-Signature-256`` without its ``sha256=``, Gitea's
    ``X-Gitea-Signature``)."""
    if not signature or not secret:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()
    # As bytes: a header of other than ASCII is simply a wrong signature.
    return hmac.compare_digest(expected, signature.strip().lower().encode("utf-8", "replace"))


_SHA = re.compile(r"\A(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")
# git check-ref-format, the parts that matter for safety: no control characters,
# no space, none of ~^:?*[\, no "..", no "@{", no leading "-" or "/", no ".lock" ends.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(?:/|\Z)")
MAX_REF_NAME = 255


def validate_ref_name(name: str) -> str:
    """Return ``name`` if git itself could have created it, else raise :class:`PayloadError`."""
    if not name or len(name) > MAX_REF_NAME:
        raise PayloadError(f"ref name must be 1 to {MAX_REF_NAME} characters long")
    if name.startswith(("-", "/", ".")) or name.endswith(("/", ".")) or name == "@":
        raise PayloadError(f"ref name {name!r} is not a valid git ref name")
    if _BAD_REF.search(name):
        raise PayloadError(f"ref name {name!r} is not a valid git ref name")
    return name


def validate_sha(value: object, field: str) -> str:
    if not isinstance(value, str) or not _SHA.match(value):
        raise PayloadError(f"{field} must be a 40 or 64 character lowercase hex commit id")
    return value


def validate_project_path(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > 255 or not PROJECT_PATH.match(value):
        raise PayloadError(
            f"{field} must be a project path such as group/app (at most 255 characters; "
            "each part letters and digits joined by single '.', '_' or '-')"
        )
    return value


def validate_project_id(value: object, field: str) -> int | None:
    """A forge's numeric project id; absent is allowed (some events lack it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise PayloadError(f"{field} must be a positive integer")
    return value


def validate_clone_url(value: object, field: str) -> str:
    """Only http(s) URLs without credentials: git's other transports (ext::, file) run code."""
    if not isinstance(value, str) or not re.match(r"\Ahttps?://[^\s@/]+/\S+\Z", value):
        raise PayloadError(
            f"{field} must be an http:// or https:// URL without user or password "
            "(OpsCD clones over HTTP with its own credentials)"
        )
    if len(value) > 1024:
        raise PayloadError(f"{field} is longer than 1024 characters")
    return value
