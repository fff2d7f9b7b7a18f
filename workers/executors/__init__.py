"""Executors behind one interface (:mod:`workers.executors.base`); pick one by name."""

from __future__ import annotations

from cicd.config import Settings
from workers.executors.base import Executor, Service, Services, Step, StepResult
from workers.executors.docker import DockerExecutor
from workers.executors.shell import ShellExecutor

__all__ = ["Executor", "Service", "Services", "Step", "StepResult", "get_executor"]


def get_executor(settings: Settings, node: str | None) -> Executor:
    """The executor ``CICD_EXECUTOR`` names, for the worker node ``node``."""
    if settings.executor == "docker":
        return DockerExecutor(settings, node)
    return ShellExecutor(settings.shell_user)
