"""Image build, tag and push: the publish stage's work on the agent's container engine.

Names come from outside (project paths, branch names), so they are made safe
for image references here, never passed through a shell. The engine reports a
failed build or push inside its JSON stream, not as an exception: every item is
checked for ``error``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import requests
from docker.errors import APIError, DockerException

from cicd.ciyaml import PublishSpec
from cicd.config import Settings
from cicd.errors import StageError
from cicd.forges import PROJECT_PATH
from workers.executors.base import OutputSink

__all__ = [
    "escape_ref",
    "repository_name",
    "image_reference",
    "build_image",
    "existing_image",
    "push_image",
    "remove_image",
]

_KEPT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_TAG = 128
#: Between a branch's name and its commit in a branch image's tag: git forbids ``..`` in
#: ref names and :func:`escape_ref` never makes it, so no tag image can look like this.
BRANCH_SEPARATOR = ".."
MANIFESTS = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
])  # fmt: skip


def escape_ref(name: str) -> str:
    """A branch or tag name as image tag characters, one-to-one: letters, digits, ``.`` and
    ``-`` stay, ``/`` is ``__``, any other character is ``_`` and its UTF-8 bytes in hex
    (``_`` itself is ``_5f``). ``feature/login`` → ``feature__login``."""
    out = []
    for char in name:
        if char in _KEPT:
            out.append(char)
        elif char == "/":
            out.append("__")
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode())
    return "".join(out)


def _bounded(escaped: str, name: str, room: int) -> str:
    """``escaped`` if it fits in ``room``, else a cut with a hash of the whole name (``_-``
    is never made by :func:`escape_ref`, so a cut one cannot equal an uncut one)."""
    if len(escaped) <= room:
        return escaped
    return f"{escaped[: room - 18]}_-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def repository_name(project: str) -> str:
    """A project's image repository path: the project path in lower case. Registered paths
    are valid repository paths in any case and unique without case (:mod:`cicd.projects`),
    so two projects never share a repository."""
    if not PROJECT_PATH.match(project):
        raise StageError("image push", f"project path {project!r} is not a repository path")
    return project.lower()


def image_reference(
    registry: str, project: str, ref_type: str, ref_name: str, sha: str
) -> tuple[str, str]:
    """``(repository, tag)``: a tag ``v1.2`` is ``:v1.2``; branch ``feature/x`` at commit
    ``1234abcd…`` is ``:feature__x..1234abcd``. Distinct refs never share an image tag."""
    repository = f"{registry.rstrip('/')}/{repository_name(project)}"
    if ref_type == "tag":
        return repository, _bounded(escape_ref(ref_name), ref_name, MAX_TAG)
    room = MAX_TAG - len(BRANCH_SEPARATOR) - 8
    branch = _bounded(escape_ref(ref_name), ref_name, room)
    return repository, f"{branch}{BRANCH_SEPARATOR}{sha[:8]}"


def _inside(checkout: Path, relative: str, what: str) -> Path:
    path = (checkout / relative).resolve()
    if not path.is_relative_to(checkout.resolve()):
        raise StageError("image build", f"{what} {relative!r} points outside the repository")
    return path


def _stream(items: Iterable[dict[str, Any]], operation: str, output: OutputSink) -> list[dict]:
    """Copy an engine JSON stream to the log; an ``error`` item is a :class:`StageError`."""
    seen = []
    for item in items:
        seen.append(item)
        if "error" in item:
            detail = item.get("errorDetail", {}).get("message") or item["error"]
            raise StageError(operation, str(detail).strip())
        text = item.get("stream") or item.get("status")
        if text:
            progress = item.get("progress")
            line = f"{text} {progress}" if progress else text
            output((line if line.endswith("\n") else line + "\n").encode())
    return seen


def _build_limits(settings: Settings) -> dict[str, int]:
    """The image build's RUN steps get the limits of a build container (memory, no swap)."""
    if not settings.docker_memory:
        return {}
    memory = docker.utils.parse_bytes(settings.docker_memory)
    return {"memory": memory, "memswap": memory}


def build_image(
    client: docker.DockerClient,
    checkout: Path,
    spec: PublishSpec,
    reference: str,
    labels: dict[str, str],
    settings: Settings,
    output: OutputSink,
) -> None:
    """Build ``reference`` from the repository's Dockerfile; the build stage's outputs are there."""
    context = _inside(checkout, spec.context, "publish.context")
    dockerfile = _inside(checkout, spec.dockerfile, "publish.dockerfile")
    if not context.is_dir():
        raise StageError("image build", f"publish.context {spec.context!r} is not a folder")
    if not dockerfile.is_file():
        raise StageError(
            "image build",
            f"no {spec.dockerfile} in the repository",
            "add one, or set publish.dockerfile in ci.yaml",
        )
    output(f"Building image {reference}\n".encode())
    try:
        stream = client.api.build(
            path=str(context),
            dockerfile=str(dockerfile),
            tag=reference,
            buildargs=dict(spec.build_args),
            labels=labels,
            network_mode=settings.docker_network,
            container_limits=_build_limits(settings),
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
        )
        _stream(stream, "image build", output)
    except (APIError, DockerException) as error:
        raise StageError("image build", getattr(error, "explanation", None) or str(error)) from None


def _registry_auth(settings: Settings) -> dict[str, str] | None:
    if settings.registry_username and settings.registry_password:
        return {
            "username": settings.registry_username,
            "password": settings.registry_password.get_secret_value(),
        }
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def existing_image(repository: str, tag: str, settings: Settings) -> str | None:
    """The image config digest ``repository:tag`` has in the registry, ``"unknown"`` for an
    index of several images, or None if the tag is not there (registry API v2, with Basic
    or token authentication). The registry speaks HTTPS unless it is on loopback (as for
    the engine) or ``CICD_REGISTRY_INSECURE`` is set."""
    host, _, name = repository.partition("/")
    hostname = urlsplit(f"//{host}").hostname or host
    scheme = "http" if settings.registry_insecure or _is_loopback(hostname) else "https"
    url = f"{scheme}://{host}/v2/{name}/manifests/{tag}"
    auth = _registry_auth(settings)
    basic = (auth["username"], auth["password"]) if auth else None
    headers = {"Accept": MANIFESTS}
    try:
        with requests.Session() as http:
            http.max_redirects = 3
            response = http.get(url, headers=headers, auth=basic, timeout=30)
            challenge = response.headers.get("WWW-Authenticate", "")
            if response.status_code == 401 and challenge.lower().startswith("bearer "):
                token = _bearer_token(http, challenge, basic, scheme)
                headers["Authorization"] = f"Bearer {token}"
                response = http.get(url, headers=headers, timeout=30)
    except requests.RequestException as error:
        raise StageError("image push", f"cannot ask the registry about {tag}: {error}") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        hint = "check CICD_REGISTRY_USERNAME and CICD_REGISTRY_PASSWORD"
        answered = f"the registry answered {response.status_code} for {repository}:{tag}"
        raise StageError("image push", answered, hint if response.status_code == 401 else None)
    try:
        return str(response.json()["config"]["digest"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


def _bearer_token(
    http: requests.Session, challenge: str, basic: tuple[str, str] | None, scheme: str
) -> str:
    """A token from the realm a registry's ``WWW-Authenticate: Bearer`` challenge names (the
    credentials go there only over HTTPS, unless the registry itself is plain HTTP)."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = fields.pop("realm", "")
    if not (realm.startswith("https://") or (scheme == "http" and realm.startswith("http://"))):
        raise StageError("image push", f"the registry's token service {realm!r} is not HTTPS")
    response = http.get(realm, params=fields, auth=basic, timeout=30)
    if response.status_code != 200:
        raise StageError("image push", f"the registry's token service answered "
                         f"{response.status_code}", "check CICD_REGISTRY_USERNAME and "
                         "CICD_REGISTRY_PASSWORD")  # fmt: skip
    body = response.json()
    return str(body.get("token") or body.get("access_token") or "")


def push_image(
    client: docker.DockerClient, repository: str, tag: str, settings: Settings, output: OutputSink
) -> str | None:
    """Push ``repository:tag`` with the registry credentials; return the pushed digest."""
    auth = _registry_auth(settings)
    output(f"Pushing {repository}:{tag}\n".encode())
    try:
        stream = client.api.push(repository, tag=tag, auth_config=auth, stream=True, decode=True)
        items = _stream(stream, "image push", output)
    except StageError as error:
        if any(word in error.message.lower() for word in ("unauthorized", "authentication")):
            error.hint = "check CICD_REGISTRY_USERNAME and CICD_REGISTRY_PASSWORD"
            raise StageError(error.operation, error.message, error.hint) from None
        raise
    except (APIError, DockerException) as error:
        raise StageError("image push", getattr(error, "explanation", None) or str(error)) from None
    for item in reversed(items):
        digest = (item.get("aux") or {}).get("Digest")
        if digest:
            return digest
        match = _DIGEST.search(str(item.get("status", "")))
        if match:
            return match.group()
    return None


def remove_image(client: docker.DockerClient, reference: str) -> None:
    """Delete the local copy of a pushed (or failed) image; the registry keeps it."""
    try:
        client.images.remove(reference, force=True)
    except (APIError, DockerException):
        pass
