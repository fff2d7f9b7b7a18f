"""The agent's container engine: a docker SDK client of Docker or podman's compatible API.

One client factory for the two users of the engine, the docker executor (build
steps in containers) and the image registry client (:mod:`workers.registry`:
image build and push), so that neither reaches into the other.
"""

from __future__ import annotations

import os

import docker
import requests
from docker.errors import DockerException

from cicd.config import Settings
from cicd.errors import StageError

__all__ = ["API_TIMEOUT", "docker_client"]

#: Seconds to wait for an engine API call that should be quick (create, kill, remove).
API_TIMEOUT = 120


def docker_client(settings: Settings) -> docker.DockerClient:
    """A client of this agent's engine, or a :class:`StageError` saying it cannot be reached."""
    base_url = (
        settings.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    )
    try:
        client = docker.DockerClient(base_url=base_url, timeout=API_TIMEOUT)
        client.ping()
    except (DockerException, requests.RequestException) as error:
        raise StageError(
            "docker",
            f"cannot reach the container engine at {base_url}: {error}",
            "start Docker (or `podman system service`) on this agent, or set CICD_DOCKER_HOST",
        ) from None
    return client
