"""Shell executor: runs the build script with ``/bin/sh`` on the worker host, in the checkout.

For hosts without a container engine. The script gets a clean environment (no
``CICD_*`` credentials of the worker), its own process group, and the whole
group is killed at the timeout so no grandchild outlives the build.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess

from workers.executors.base import Executor, OutputSink, Step, StepResult, Watchdog, shell_script

__all__ = ["ShellExecutor"]

#: Host variables a build may see; everything else (credentials!) stays out.
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "JAVA_HOME")
KILL_GRACE_SECONDS = 5
TICK_SECONDS = 0.25


class ShellExecutor(Executor):
    name = "shell"

    def run(self, step: Step, output: OutputSink) -> StepResult:
        home = step.workspace.parent / "home"
        home.mkdir(exist_ok=True)
        environment = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
        environment.update(HOME=str(home), **step.environment)
        process = subprocess.Popen(
            ["/bin/sh", "-c", shell_script(step.commands)],
            cwd=step.workspace,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as one
        )
        watchdog = Watchdog(step)
        with watchdog.fence(lambda: _kill_leftovers(process)), selectors.DefaultSelector() as sel:
            sel.register(process.stdout, selectors.EVENT_READ)
            while True:
                if watchdog.should_stop():
                    _kill_group(process, grace=not watchdog.fenced)
                if sel.select(TICK_SECONDS):
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    output(chunk)
                else:
                    output(b"")
                    if process.poll() is not None:
                        break  # the script ended; a background child still holds the pipe
        process.stdout.close()
        code = process.wait()
        _kill_leftovers(process)
        return watchdog.result(128 - code if code < 0 else code)


def _kill_leftovers(process: subprocess.Popen) -> None:
    """Background processes the script started die with the build, as on a CI runner."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_group(process: subprocess.Popen, grace: bool = True) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after a grace period."""
    try:
        if grace:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
