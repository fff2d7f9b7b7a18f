"""The ``cicd`` command: set up the database and run OpsCD's processes."""

from __future__ import annotations

import os
import sys

import click

from cicd.config import load_settings
from cicd.errors import ConfigError

__all__ = ["main"]


@click.group()
def main() -> None:
    """OpsCD: GitLab push → build on a Celery worker fleet → image in a registry."""


def _settings():
    try:
        return load_settings()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


@main.command("init-db")
def init_db() -> None:
    """Create the tables that do not exist yet in CICD_DATABASE_URL."""
    _settings()
    from cicd import db

    db.create_schema()
    click.echo("database schema is ready")


@main.command()
@click.option("--bind", default="127.0.0.1:8000", show_default=True, help="Address to listen on.")
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes.")
def web(bind: str, workers: int) -> None:
    """Serve the webhook and the API with gunicorn."""
    settings = _settings()
    try:
        settings.require_webhook_secret()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    args = ["gunicorn", "--no-control-socket", "--bind", bind, "--workers", str(workers),
            "--worker-class", "gthread", "--threads", "8", "cicd:create_app()"]  # fmt: skip
    os.execvp(sys.executable, [sys.executable, "-m", *args])


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--name", default="agent", show_default=True, help="Node name before '@host'.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(name: str, celery_args: tuple[str, ...]) -> None:
    """Run a worker node (``celery worker``); extra arguments go to celery."""
    settings = _settings()
    args = [
        "celery", "-A", "workers.celery_app", "worker", "-n", f"{name}@%h",
        "--concurrency", str(settings.worker_concurrency), "-E", *celery_args,
    ]  # fmt: skip
    os.execvp(sys.executable, [sys.executable, "-m", *args])


if __name__ == "__main__":
    main()
