"""Step → container: the pure translation of a build step into Docker Engine API arguments.

Kept apart from :mod:`workers.executors.docker` (which talks to the engine) so
the rules are in one readable place: the checkout is bind-mounted at
``workdir`` and is the working directory; the agent's Maven settings and extra
volumes are mounted as configured; the container is never privileged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cicd.config import Settings
from workers.executors.base import Service, Step, shell_script

__all__ = ["container_options", "service_options", "LABEL_TASK", "LABEL_NODE"]

#: Labels on every build container, so leftovers can be found and removed.
LABEL_TASK = "dev.opscd.task"
LABEL_NODE = "dev.opscd.node"


def container_options(
    step: Step, settings: Settings, name: str, labels: dict[str, str]
) -> dict[str, Any]:
    """Keyword arguments for ``client.containers.create`` running ``step``."""
    volumes = [f"{step.workspace}:{step.workdir}:rw"]
    if settings.maven_settings is not None:
        volumes.append(f"{settings.maven_settings}:{settings.maven_settings_target}:ro")
    volumes.extend(settings.volumes)
    network = settings.docker_network
    if step.services is not None:  # the services' namespace, and a hosts file naming them
        network = step.services.network_mode
        volumes.append(f"{step.services.hosts_file}:/etc/hosts:ro")
    options: dict[str, Any] = {
        "image": step.image,
        "name": name,
        "command": ["/bin/sh", "-c", shell_script(step.commands, step.directory)],
        "working_dir": step.workdir,
        "environment": dict(step.environment),
        "volumes": volumes,
        "network_mode": network,
        "labels": labels,
        **_locked_down(settings),
    }
    return options


def service_options(
    service: Service, settings: Settings, name: str, labels: dict[str, str], network: str,
    hosts_file: Path,
) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments for ``client.containers.create`` running ``service``: locked down and
    limited like a step, in ``network`` (the first service's: the agent's network)."""
    options: dict[str, Any] = {
        "image": service.image,
        "name": name,
        "environment": dict(service.environment),
        "volumes": [f"{hosts_file}:/etc/hosts:ro"],
        "network_mode": network,
        "labels": labels,
        **_locked_down(settings),
    }
    if service.commands:
        options["command"] = ["/bin/sh", "-c", shell_script(service.commands)]
    return options


def _locked_down(settings: Settings) -> dict[str, Any]:
    """What every build container gets: no privileges, and the agent's limits."""
    options: dict[str, Any] = {
        "privileged": False,
        "security_opt": ["no-new-privileges"],
        "pids_limit": settings.docker_pids_limit,
        "stdin_open": False,
        "tty": False,
        "detach": True,
    }
    if settings.docker_memory:
        options["mem_limit"] = settings.docker_memory
    if settings.docker_cpus:
        options["nano_cpus"] = int(settings.docker_cpus * 1_000_000_000)
    return options
