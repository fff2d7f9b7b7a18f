"""Each OpsCD process's command line, defined once.

The Procfile (:func:`procfile`, checked by a test), ``cicd web|worker|flower``,
``cicd up``, the tests and the bench all start their processes from these, so
a gunicorn or celery option is changed in one place. Command lines are lists
of arguments (never shell strings); :func:`with_python` runs one with a given
interpreter instead of the tool found on ``PATH``.
"""

from __future__ import annotations

import shlex
import sys

__all__ = [
    "WEB_APP",
    "WORKER_APP",
    "MONITOR_APP",
    "web",
    "worker",
    "flower",
    "reporter",
    "with_python",
    "procfile",
]

#: What gunicorn serves: the Flask app factory of the web side.
WEB_APP = "cicd.web:create_app()"
#: The Celery app of a worker node: the shared app with the stage tasks and handlers.
WORKER_APP = "workers.celery_app"
#: The Celery app of the reporter, which posts commit statuses to the forges.
REPORTER_APP = "cicd.reporter"
#: The Celery app Flower watches: the shared one, without any worker code.
MONITOR_APP = "cicd.broker"


def web(bind: str, workers: int | str = 2, app: str = WEB_APP) -> list[str]:
    """gunicorn: ``workers`` processes of 8 threads each (gthread), no control socket."""
    return ["gunicorn", "--no-control-socket", "--bind", bind, "--workers", str(workers),
            "--worker-class", "gthread", "--threads", "8", app]  # fmt: skip


def worker(node: str, concurrency: int | str | None = None, app: str = WORKER_APP) -> list[str]:
    """A worker node named ``node`` (``NAME`` becomes ``NAME@%h``), with task events.

    Without ``concurrency``, the node runs ``CICD_WORKER_CONCURRENCY`` builds.
    """
    name = node if "@" in node else f"{node}@%h"
    args = ["celery", "-A", app, "worker", "-n", name, "-E", "--loglevel", "INFO"]
    return args + (["--concurrency", str(concurrency)] if concurrency is not None else [])


def reporter(node: str = "reporter") -> list[str]:
    """The reporter (control plane, one or more): a solo pool that consumes the statuses queue
    only (the app selects it)."""
    name = node if "@" in node else f"{node}@%h"
    return ["celery", "-A", REPORTER_APP, "worker", "-n", name, "--pool", "solo",
            "--loglevel", "INFO"]  # fmt: skip


def flower(address: str, port: int | str) -> list[str]:
    """Flower on the shared app; its login comes through ``FLOWER_BASIC_AUTH``, never argv."""
    return ["celery", "-A", MONITOR_APP, "flower", f"--address={address}", f"--port={port}"]


def with_python(args: list[str], python: str = sys.executable) -> list[str]:
    """The same command run as ``python -m TOOL``: the tool of this interpreter's packages."""
    return [python, "-m", *args]


def _shell_words(args: list[str]) -> str:
    """Arguments as one Procfile line: ``${VAR:-default}`` stays open for the shell."""
    return " ".join(arg if "${" in arg else shlex.quote(arg) for arg in args)


def procfile() -> str:
    """The Procfile's text: these processes, with the platform's ``$PORT`` and settings."""
    lines = {
        "web": web("0.0.0.0:${PORT:-8000}", "${WEB_CONCURRENCY:-2}"),  # a platform routes to it
        "worker": worker("${CICD_AGENT_NAME:-agent}", "${CICD_WORKER_CONCURRENCY:-3}"),
        # `cicd flower` refuses to start without a login, then runs flower().
        "flower": ["cicd", "flower", "--address", "0.0.0.0", "--port", "${PORT:-5555}"],  # noqa: S104
        # Last: honcho gives each process a port in order (web +0, worker +100, flower +200).
        "reporter": reporter(),
    }
    return "".join(f"{name}: {_shell_words(args)}\n" for name, args in lines.items())


if __name__ == "__main__":
    sys.stdout.write(procfile())
