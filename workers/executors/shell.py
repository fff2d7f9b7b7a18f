"""Shell executor: runs the build script with ``/bin/sh`` on the worker host, in the checkout.

For hosts without a container engine. The script gets a clean environment (no
``CICD_*`` credentials of the worker), its own process group, and the whole
group is killed at the timeout so no grandchild outlives the build. With
``CICD_SHELL_USER`` it runs as that unprivileged user, owner of its workspace
(checkout and HOME) and of nothing else: a root worker's ``/proc/<pid>/environ``
and its configuration file are out of its reach. The workspace root is then
``0711``: a build can enter its own folder but list no other.
"""

from __future__ import annotations

import os
import pwd
import selectors
import signal
import subprocess
from pathlib import Path

from workers.executors.base import Executor, OutputSink, Step, StepResult, Watchdog, shell_script

__all__ = ["ShellExecutor"]

#: Host variables a build may see; everything else (credentials!) stays out.
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "JAVA_HOME")
KILL_GRACE_SECONDS = 5
TICK_SECONDS = 0.25


class ShellExecutor(Executor):
    name = "shell"

    def __init__(self, user: str | None = None) -> None:
        self.user = user

    def run(self, step: Step, output: OutputSink) -> StepResult:
        home = step.workspace.parent / "home"
        home.mkdir(exist_ok=True)
        environment = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
        environment.update(HOME=str(home), **step.environment)
        as_user: dict = {}
        if self.user:
            entry = pwd.getpwnam(self.user)
            _hand_over(step.workspace.parent, entry.pw_uid, entry.pw_gid)
            environment.update(USER=entry.pw_name, LOGNAME=entry.pw_name)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
                       "umask": 0o077}  # fmt: skip
        process = subprocess.Popen(
            ["/bin/sh", "-c", shell_script(step.commands, step.directory)],
            cwd=step.workspace,
            env=environment,
            **as_user,
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
                        # The script ended (a background child may still hold the pipe):
                        # what it wrote between the wait and its exit is read, not dropped.
                        _drain(process.stdout.fileno(), output)
                        break
        process.stdout.close()
        code = process.wait()
        _kill_leftovers(process)
        return watchdog.result(128 - code if code < 0 else code)


def _drain(fd: int, output: OutputSink) -> None:
    """Read what the pipe holds now, without waiting for an end a background child may keep
    from coming."""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        output(chunk)


def _hand_over(workspace: Path, uid: int, gid: int) -> None:
    """The build user owns its workspace (the checkout, HOME); the root above lets it enter
    its own folder without listing the others."""
    workspace.parent.chmod(0o711)
    for folder, dirs, files in os.walk(workspace):
        os.chown(folder, uid, gid, follow_symlinks=False)
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


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
