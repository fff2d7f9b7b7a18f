"""Image build, tag and push: the publish stage's work on the agent's container engine.

Names come from outside (project paths, branch names), so they are made safe
for image references here, never passed through a shell. The engine reports a
failed build or push inside its JSON stream, not as an exception: every item is
checked for ``error``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException

from cicd.ciyaml import PublishSpec
from cicd.config import Settings
from cicd.errors import StageError
from workers.executors.base import OutputSink

__all__ = [
    "tag_safe",
    "repository_name",
    "image_reference",
    "build_image",
    "push_image",
    "remove_image",
]

_TAG_INVALID = re.compile(r"[^A-Za-z0-9_.-]+")
_COMPONENT_SEPARATORS = re.compile(r"[^a-z0-9]+")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_TAG = 128


def tag_safe(name: str) -> str:
    """A valid image tag made from a branch or tag name: ``feature/login`` → ``feature-login``."""
    tag = _TAG_INVALID.sub("-", name).lstrip(".-")[:MAX_TAG]
    return tag or "untitled"


def repository_name(project: str) -> str:
    """An image repository path made from a project path: lower case, safe separators."""

    def component(text: str) -> str:
        def separator(match: re.Match[str]) -> str:
            return match.group() if match.group() in (".", "_", "__") else "-"

        return _COMPONENT_SEPARATORS.sub(separator, text.lower()).strip("._-")

    components = [c for c in (component(part) for part in project.split("/")) if c]
    return "/".join(components) or "project"


def image_reference(
    registry: str, project: str, ref_type: str, ref_name: str, sha: str
) -> tuple[str, str]:
    """``(repository, tag)``: branches as ``<branch>-<short sha>``, tags as themselves."""
    repository = f"{registry.rstrip('/')}/{repository_name(project)}"
    if ref_type == "tag":
        return repository, tag_safe(ref_name)
    return repository, f"{tag_safe(ref_name)[: MAX_TAG - 9]}-{sha[:8]}"


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
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
        )
        _stream(stream, "image build", output)
    except (APIError, DockerException) as error:
        raise StageError("image build", getattr(error, "explanation", None) or str(error)) from None


def push_image(
    client: docker.DockerClient, repository: str, tag: str, settings: Settings, output: OutputSink
) -> str | None:
    """Push ``repository:tag`` with the registry credentials; return the pushed digest."""
    auth = None
    if settings.registry_username and settings.registry_password:
        auth = {
            "username": settings.registry_username,
            "password": settings.registry_password.get_secret_value(),
        }
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
