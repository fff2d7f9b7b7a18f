"""Executors behind one interface (:mod:`workers.executors.base`); pick one by name."""

from __future__ import annotations

from workers.executors.base import Executor, Step, StepResult
from workers.executors.shell import ShellExecutor

__all__ = ["Executor", "Step", "StepResult", "get_executor"]

_EXECUTORS: dict[str, type[Executor]] = {"shell": ShellExecutor}


def get_executor(name: str) -> Executor:
    """The executor called ``name`` (``CICD_EXECUTOR``)."""
    return _EXECUTORS[name]()
