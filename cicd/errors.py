"""One exception family for OpsCD; every message says what is wrong and how to fix it.

Errors raised inside a build end up in ``task_states.error`` and in the build log,
so their text must be useful to the person who pushed, and must never contain a
credential (callers mask secrets before raising; see :mod:`workers.logs`).
"""

from __future__ import annotations

__all__ = [
    "OpsCDError",
    "ConfigError",
    "PayloadError",
    "PipelineError",
    "StageError",
    "BuildFailed",
    "BuildCanceled",
    "LeaseLost",
]


class OpsCDError(Exception):
    """Base class of every error OpsCD raises on purpose."""


class ConfigError(OpsCDError):
    """A setting is missing or invalid; raised at start-up, before serving anything."""


class PayloadError(OpsCDError):
    """A webhook body cannot be understood; answered with HTTP 400 and this message."""


class PipelineError(OpsCDError):
    """The repository's ``ci.yaml`` is missing or invalid; the message names line and field."""


class StageError(OpsCDError):
    """A stage could not do its work for a reason other than the build script failing.

    ``operation`` names what was being done ("git clone"), ``hint`` how to fix it.
    """

    def __init__(self, operation: str, message: str, hint: str | None = None) -> None:
        self.operation = operation
        self.message = message
        self.hint = hint
        text = f"{operation}: {message}"
        if hint:
            text += f" (hint: {hint})"
        super().__init__(text)

    def __reduce__(self) -> tuple:  # Celery pickles task errors for its signals
        return type(self), (self.operation, self.message, self.hint)


class BuildFailed(OpsCDError):
    """The build script ran and failed: a non-zero exit code, or the timeout killed it.

    This is the user's build failing, not OpsCD failing: the task ends ``failed``
    with ``exit_code`` recorded and the log kept.
    """

    def __init__(self, exit_code: int | None, message: str) -> None:
        self.exit_code = exit_code
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return type(self), (self.exit_code, str(self))


class BuildCanceled(OpsCDError):
    """Someone canceled the build while it ran; its processes or container were killed."""


class LeaseLost(OpsCDError):
    """This agent's heartbeats stopped reaching the database, so it stopped the build before
    another agent could run it again (:mod:`workers.lease`). Not the build's result: the
    build runs again, here once the database answers, or on another agent."""
