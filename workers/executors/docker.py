"""Docker executor: runs the build script in a container of ``build.image``, on any Engine API.

Works against Docker or podman's compatible API (``CICD_DOCKER_HOST`` /
``DOCKER_HOST``). The exit code decides; the timeout kills the container; the
container is removed in every case, and containers a crashed worker left
behind are removed when the node starts or stops (found by their labels).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container

from cicd.config import Settings, load_settings
from cicd.errors import StageError
from workers.engine import API_TIMEOUT, docker_client
from workers.executors.base import (
    Executor,
    OutputSink,
    Service,
    Services,
    Step,
    StepResult,
    Watchdog,
)
from workers.executors.convert import LABEL_NODE, LABEL_TASK, container_options, service_options

__all__ = ["DockerExecutor", "remove_node_containers"]

TICK_SECONDS = 0.25
EXIT_CHECK_SECONDS = 1.0  # how often the engine is asked whether the container ended
DRAIN_SECONDS = 5.0  # how long a log stream may stay open after its container ended

log = logging.getLogger(__name__)


class DockerExecutor(Executor):
    name = "docker"

    def __init__(self, settings: Settings | None = None, node: str | None = None) -> None:
        self.settings = settings or load_settings()
        self.node = node or "unknown"

    def describe(self, step: Step) -> str:
        return f"the docker executor in {step.image}"

    def run(self, step: Step, output: OutputSink) -> StepResult:
        if not step.image:
            raise StageError(
                "docker run",
                "no image to run the build in",
                "set build.image in ci.yaml, or a build.language with a default image",
            )
        if self.settings.maven_settings and not self.settings.maven_settings.is_file():
            raise StageError(
                "docker run",
                f"CICD_MAVEN_SETTINGS={self.settings.maven_settings} is not a file on this agent",
            )
        client = docker_client(self.settings)
        try:
            self._ensure_image(client, step.image, output)
            labels = {LABEL_TASK: step.name, LABEL_NODE: self.node}
            name = f"opscd-{container_safe(step.name)}-{uuid.uuid4().hex[:8]}"
            try:
                container = client.containers.create(
                    **container_options(step, self.settings, name, labels)
                )
            except APIError as error:
                raise StageError("docker create", _explain(error)) from None
            try:
                return self._run_container(container, step, output)
            finally:
                _remove(container)
        finally:
            client.close()

    @contextmanager
    def services(
        self, build: str, services: list[Service], workspace: Path, output: OutputSink
    ) -> Iterator[Services]:
        """Start each service in one network namespace (the first one's, in the agent's
        network), with a hosts file that names them all 127.0.0.1, and remove them when the
        build's steps are done. A node that dies meanwhile removes them when it starts again,
        as its step containers (by their labels)."""
        names = tuple(service.name for service in services)
        hosts = workspace / "hosts"
        hosts.write_text(f"127.0.0.1\tlocalhost {' '.join(names)}\n::1\tlocalhost ip6-localhost\n")
        client = docker_client(self.settings)
        started: list[Container] = []
        try:
            for service in services:
                self._ensure_image(client, service.image, output)
                network = f"container:{started[0].id}" if started else self.settings.docker_network
                labels = {LABEL_TASK: f"{build}-{service.name}", LABEL_NODE: self.node}
                name = f"opscd-{container_safe(build)}-{service.name}-{uuid.uuid4().hex[:8]}"
                try:
                    container = client.containers.create(
                        **service_options(service, self.settings, name, labels, network, hosts)
                    )
                    started.append(container)
                    container.start()
                except APIError as error:
                    raise StageError(f"service {service.name}", _explain(error)) from None
                output(f"Started service {service.name} ({service.image})\n".encode())
            yield Services(network_mode=f"container:{started[0].id}", hosts_file=hosts,
                           names=names)  # fmt: skip
        finally:
            for container in reversed(started):  # the namespace's holder last
                _remove(container)
            client.close()

    def _ensure_image(self, client: docker.DockerClient, image: str, output: OutputSink) -> None:
        policy = self.settings.docker_pull
        if policy != "always":
            try:
                client.images.get(image)
                return
            except ImageNotFound:
                if policy == "never":
                    raise StageError(
                        "docker run",
                        f"image {image!r} is not on this agent and CICD_DOCKER_PULL=never",
                        "check build.image in ci.yaml, or load the image on the agent",
                    ) from None
        output(f"Pulling {image}\n".encode())
        try:
            client.images.pull(image)
        except (APIError, NotFound) as error:
            raise StageError(
                "docker pull",
                f"image {image!r} could not be pulled: {_explain(error)}",
                "check build.image in ci.yaml",
            ) from None

    def _run_container(self, container: Container, step: Step, output: OutputSink) -> StepResult:
        """Start, stream the output until the container ends, kill it at the deadline.

        The log stream normally ends with the container, but podman's API has kept a
        follow stream open after its container exited (podman#6627, #11461; seen here under
        load): the engine's own state decides, and a stream still open ``DRAIN_SECONDS``
        after the container ended is closed, so a build never hangs on it.
        """
        container.start()
        copy = _LogCopy(container, output)
        copy.start()
        watchdog = Watchdog(step)
        ended_at: float | None = None
        checked = time.monotonic()
        with watchdog.fence(lambda: _kill(container)):
            while copy.is_alive():
                copy.join(TICK_SECONDS)
                output(b"")
                if watchdog.should_stop():
                    _kill(container)
                now = time.monotonic()
                if ended_at is None and now - checked >= EXIT_CHECK_SECONDS:
                    checked = now
                    if _has_ended(container):
                        ended_at = now
                elif ended_at is not None and now - ended_at >= DRAIN_SECONDS:
                    copy.close()
                    output(b"\n[opscd] the engine kept the log stream open after the container "
                           b"ended; closed it\n")  # fmt: skip
                    break
        status = container.wait(timeout=API_TIMEOUT)
        return watchdog.result(int(status.get("StatusCode", -1)))


class _LogCopy(threading.Thread):
    """Copies a container's output to the sink, until the stream ends or is closed."""

    def __init__(self, container: Container, output: OutputSink) -> None:
        super().__init__(daemon=True)
        self.container = container
        self.output = output
        self.stream = None
        self.closed = False

    def run(self) -> None:
        try:
            self.stream = self.container.logs(stream=True, follow=True, stdout=True, stderr=True)
            for chunk in self.stream:
                self.output(chunk)
        except (APIError, requests.RequestException, OSError, ValueError) as error:
            if not self.closed:  # a stream closed on purpose ends with an error: expected
                self.output(f"\n[opscd] log stream interrupted: {error}\n".encode())

    def close(self) -> None:
        """Shut the stream's socket, which ends the read blocked on it."""
        self.closed = True
        if self.stream is not None:
            self.stream.close()


def _has_ended(container: Container) -> bool:
    """Whether the engine says the container is no longer running (it is gone, or ended)."""
    try:
        container.reload()
    except NotFound:
        return True
    except (APIError, requests.RequestException):
        return False
    return container.status in ("exited", "dead", "stopped")


def container_safe(name: str) -> str:
    """A step's name as a container name may hold it (a matrix step's has spaces, ``=``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:100] or "step"


def _kill(container: Container) -> None:
    try:
        container.kill()
    except (APIError, NotFound):
        pass  # it ended on its own meanwhile


def _remove(container: Container) -> None:
    try:
        container.remove(force=True, v=True)
    except NotFound:
        pass


def _joins_another(container: Container) -> bool:
    """Whether the container lives in another container's network namespace."""
    mode = container.attrs.get("HostConfig", {}).get("NetworkMode") or ""
    return str(mode).startswith("container:")


def _explain(error: DockerException) -> str:
    return getattr(error, "explanation", None) or str(error)


def remove_node_containers(settings: Settings, node: str) -> int:
    """Remove every build container this node left (after a crash or on shutdown)."""
    try:
        client = docker_client(settings)
    except StageError:
        return 0
    try:
        leftovers = client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node}"})
        # Those in another's network namespace (steps, later services) first: the engine
        # keeps a namespace's holder while containers depend on it.
        leftovers.sort(key=lambda container: not _joins_another(container))
        removed = 0
        for container in leftovers:
            try:
                _remove(container)
                removed += 1
            except APIError as error:  # one that cannot go must not keep the others
                log.warning("container %s not removed: %s", container.name, _explain(error))
        return removed
    finally:
        client.close()
