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


@main.command()
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5555, show_default=True, help="Port to listen on.")
def flower(address: str, port: int) -> None:
    """Run Flower, Celery's monitor, on the same broker, behind a login."""
    settings = _settings()
    if not (settings.flower_user and settings.flower_password):
        raise click.ClickException(
            "set CICD_FLOWER_USER and CICD_FLOWER_PASSWORD: Flower can stop any build, "
            "so OpsCD never serves it without a login"
        )
    credentials = f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"
    # Through the environment, not the command line, where `ps` would show it.
    env = {**os.environ, "FLOWER_BASIC_AUTH": credentials}
    args = ["celery", "-A", "workers.celery_app", "flower",
            f"--address={address}", f"--port={port}"]  # fmt: skip
    os.execvpe(sys.executable, [sys.executable, "-m", *args], env)


# --- watching builds and the fleet, through the REST API --------------------------------------

api_url_option = click.option(
    "--url",
    envvar="CICD_API_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Base URL of the OpsCD web process (or CICD_API_URL).",
)


def _get(url: str, path: str, **params: object) -> dict:
    import requests

    try:
        response = requests.get(url.rstrip("/") + path, params=params, timeout=10)
    except requests.RequestException as error:
        raise click.ClickException(f"cannot reach OpsCD at {url}: {error}") from None
    if not response.ok:
        message = (
            response.json().get("error")
            if response.headers.get("Content-Type", "").startswith("application/json")
            else response.text
        )
        raise click.ClickException(f"{response.status_code}: {message}")
    return response.json()


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain aligned table: one header line, one line per row, no borders."""
    cells = [[title for title, _ in columns]]
    cells += [["" if row.get(key) is None else str(row[key]) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


@main.command()
@api_url_option
@click.option("--project", help="Only this project (path with namespace).")
@click.option("--branch", help="Only this branch.")
@click.option("--state", help="Only builds in this state (queued, running, success, ...).")
@click.option("--limit", default=20, show_default=True, help="How many builds.")
def tasks(url: str, project: str | None, branch: str | None, state: str | None, limit: int) -> None:
    """List builds, newest first."""
    params = {k: v for k, v in {"project": project, "branch": branch, "state": state}.items() if v}
    rows = _get(url, "/api/tasks", limit=limit, **params)["tasks"]
    for row in rows:
        row["ref"] = row["ref_name"] + (" (tag)" if row["ref_type"] == "tag" else "")
        row["commit"] = row["commit_sha"][:8]
        row["duration"] = f"{row['duration_seconds']:.1f}s" if row["duration_seconds"] else None
    columns = [("ID", "task_id"), ("PROJECT", "project"), ("REF", "ref"), ("COMMIT", "commit"),
               ("STATE", "state"), ("STAGE", "stage"), ("AGENT", "worker"),
               ("DURATION", "duration")]  # fmt: skip
    click.echo(_table(rows, columns))


@main.command()
@api_url_option
def agents(url: str) -> None:
    """List worker nodes: online or not, builds running, load, last heartbeat."""
    rows = _get(url, "/api/agents")["agents"]
    for row in rows:
        row["status"] = "online" if row["online"] else "offline"
        row["running"] = f"{row['active']}/{row['concurrency']}"
        row["heartbeat"] = f"{row['seconds_since_heartbeat']:.0f}s ago"
    columns = [("AGENT", "hostname"), ("STATUS", "status"), ("RUNNING", "running"),
               ("PROCESSED", "processed"), ("LOAD", "loadavg"), ("HEARTBEAT", "heartbeat"),
               ("VERSION", "sw_version")]  # fmt: skip
    click.echo(_table(rows, columns))


@main.command()
@api_url_option
@click.argument("task_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the build ends.")
def logs(url: str, task_id: int, follow: bool) -> None:
    """Print a build's log; with --follow, live until it ends, then exit with its result."""
    import requests

    endpoint = f"{url.rstrip('/')}/api/tasks/{task_id}/log"
    if not follow:
        response = requests.get(endpoint, timeout=30)
        if response.status_code == 404:
            raise click.ClickException(f"no task {task_id}")
        click.echo(response.text, nl=False)
        return
    state = None
    with requests.get(endpoint, params={"follow": 1}, stream=True, timeout=(10, 120)) as response:
        if response.status_code == 404:
            raise click.ClickException(f"no task {task_id}")
        event, data = None, []
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") or line == "data:":
                data.append(line[6:])
            elif not line:
                if event == "end":
                    state = data[0] if data else None
                    break
                if data:
                    click.echo("\n".join(data), nl=False)
                event, data = None, []
    click.echo(f"\n[build {task_id} ended: {state}]", err=True)
    sys.exit(0 if state == "success" else 1)


if __name__ == "__main__":
    main()
