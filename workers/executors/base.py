"""The one executor interface: run a build step somewhere and report how it ended.

Like Woodpecker's backends: a step is plain data the stage builds from
``ci.yaml``; executors never see the YAML. A failing script is not an executor
error: it is a :class:`StepResult` with a non-zero exit code.
"""

from __future__ import annotations

import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cicd.errors import StageError
from workers import lease

__all__ = [
    "Step", "StepResult", "Service", "Services", "Executor", "OutputSink", "Watchdog",
    "shell_script",
]  # fmt: skip

#: Receives output as it arrives; called often, also with ``b""`` as a clock tick.
OutputSink = Callable[[bytes], None]


@dataclass(frozen=True)
class Service:
    """A container the steps of one build reach by its name (ci.yaml's ``services:``)."""

    name: str
    image: str
    environment: dict[str, str] = field(default_factory=dict)
    #: Run instead of the image's own command, by ``sh -e``.
    commands: list[str] | None = None


@dataclass(frozen=True)
class Services:
    """A build's running services as its steps join them: one network namespace (every
    service and step reaches the others on localhost) and a hosts file that names them."""

    network_mode: str
    hosts_file: Path
    names: tuple[str, ...]


@dataclass(frozen=True)
class Step:
    """One build step: commands to run in a workspace, with an environment and a time limit."""

    name: str
    commands: list[str]
    workspace: Path  # host folder holding the checkout
    workdir: str  # where the commands see the checkout (a container path for docker)
    environment: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    #: Where in the checkout the commands run (ci.yaml's ``directory``, checked to be a
    #: relative path inside it).
    directory: str = "."
    #: The build's services, which the step joins (docker executor).
    services: Services | None = None
    timeout: float = 3600
    #: Asked about once a second; True stops the step (a user canceled the build).
    canceled: Callable[[], bool] = field(default=lambda: False, compare=False)


@dataclass(frozen=True)
class StepResult:
    """How a step ended: ``exit_code`` as a shell reports it (128 + signal when killed).

    ``fenced``: stopped because this node's lease expired (:mod:`workers.lease`):
    not the build's result, the build runs again.
    """

    exit_code: int
    timed_out: bool = False
    canceled: bool = False
    fenced: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.canceled or self.fenced)


class Executor(ABC):
    """Runs steps. Implementations: :mod:`workers.executors.shell` (docker arrives later)."""

    name: str

    @abstractmethod
    def run(self, step: Step, output: OutputSink) -> StepResult:
        """Run ``step`` to its end or its timeout, streaming its output to ``output``."""

    def describe(self, step: Step) -> str:
        """How ``step`` runs, for the build log: "the shell executor"."""
        return f"the {self.name} executor"

    def services(
        self, build: str, services: list[Service], workspace: Path, output: OutputSink
    ) -> AbstractContextManager[Services]:
        """Start ``services`` for the steps of build ``build`` (a name for labels); they are
        stopped and removed when the context ends, whatever ends it."""
        raise StageError(
            "services",
            f"ci.yaml's services need the docker executor; this agent runs builds with the "
            f"{self.name} executor",
            "run the build on an agent with CICD_EXECUTOR=docker, or start what the steps "
            "need in a step of their own",
        )


class Watchdog:
    """Tells a running step when to stop: at its deadline, when it was canceled, or when the
    node's lease expired (also from another thread, see :meth:`fence`)."""

    CANCEL_POLL_SECONDS = 1.0

    def __init__(self, step: Step) -> None:
        self.step = step
        self.deadline = time.monotonic() + step.timeout
        self._next_poll = time.monotonic() + self.CANCEL_POLL_SECONDS
        self.timed_out = False
        self.canceled = False
        self.fenced = False

    @contextmanager
    def fence(self, kill: Callable[[], None]) -> Iterator[None]:
        """While the step runs, ``kill`` it at once if the lease expires, even if the thread
        that ticks this watchdog is stuck (e.g. storing a log line on a cut connection)."""

        def stop() -> None:
            self.fenced = True
            kill()

        with lease.guard(stop):
            yield

    def should_stop(self) -> bool:
        """True once, the first time the step must be killed; call it on every tick."""
        if self.timed_out or self.canceled or self.fenced:
            return False
        if lease.expired():
            self.fenced = True
            return True
        now = time.monotonic()
        if now >= self.deadline:
            self.timed_out = True
            return True
        if now >= self._next_poll:
            self._next_poll = now + self.CANCEL_POLL_SECONDS
            if self.step.canceled():
                self.canceled = True
                return True
        return False

    def result(self, exit_code: int) -> StepResult:
        return StepResult(exit_code, self.timed_out, self.canceled, self.fenced)


def shell_script(commands: list[str], directory: str = ".") -> str:
    """A POSIX sh script that echoes each command, runs it, and stops at the first failure;
    in ``directory`` of the checkout, when it is not the checkout itself."""
    lines = ["set -e"]
    if directory not in ("", "."):
        lines.append(f"cd -- {shlex.quote(directory)}")
    for command in commands:
        lines.append(f"printf '%s\\n' {shlex.quote('$ ' + command)}")
        lines.append(command)
    return "\n".join(lines) + "\n"
