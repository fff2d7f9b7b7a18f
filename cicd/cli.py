"""The ``cicd`` command: set up the database and run OpsCD's processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cicd import processes
from cicd.config import load_settings
from cicd.errors import ConfigError, OpsCDError
from cicd.forges import FORGES, FORK_MRS

if TYPE_CHECKING:
    import requests

__all__ = ["main"]


@click.group()
def main() -> None:
    """OpsCD: GitLab push → build on a Celery worker fleet → image in a registry."""


def _settings():
    try:
        return load_settings()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@click.option(
    "--sql",
    "as_sql",
    is_flag=True,
    help="Print the migrations as SQL instead (for a DBA); see --dialect.",
)
@click.option(
    "--dialect",
    type=click.Choice(["mysql", "postgresql"]),
    default="mysql",
    show_default=True,
    help="The SQL of --sql: MariaDB/MySQL or PostgreSQL.",
)
def migrate(as_sql: bool, dialect: str = "mysql") -> None:
    """Create the schema in CICD_DATABASE_URL, or upgrade it in place to this version's."""
    if as_sql:
        from cicd import migrations

        click.echo(migrations.sql(dialect), nl=False)
        return
    from cicd import db

    try:
        db.configure(_settings())
        before, after = db.migrate()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    if before == after:
        click.echo(f"database schema is ready (revision {after})")
    else:
        click.echo(f"database schema is ready: upgraded from {before or 'nothing'} to {after}")


@main.command("init-db")
@click.pass_context
def init_db(context: click.Context) -> None:
    """The same as migrate: create or upgrade the schema."""
    context.invoke(migrate, as_sql=False)


@main.command()
@click.option("--bind", default="127.0.0.1:8000", show_default=True, help="Address to listen on.")
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes.")
def web(bind: str, workers: int) -> None:
    """Serve the webhook and the API with gunicorn."""
    settings = _settings()
    try:
        settings.require("database_url", "broker_url")
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    os.execv(sys.executable, processes.with_python(processes.web(bind, workers)))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--name", default="agent", show_default=True, help="Node name before '@host'.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(name: str, celery_args: tuple[str, ...]) -> None:
    """Run a worker node (``celery worker``); extra arguments go to celery."""
    settings = _settings()
    args = [*processes.worker(name, settings.worker_concurrency), *celery_args]
    os.execv(sys.executable, processes.with_python(args))


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
    os.execve(sys.executable, processes.with_python(processes.flower(address, port)), env)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port of the web API and webhook.")
@click.option("--flower-port", default=5555, show_default=True, help="Port of Flower.")
def up(host: str, port: int, flower_port: int) -> None:
    """Run all of OpsCD on this machine with zero configuration, until Ctrl-C."""
    from cicd.up import up as run_up

    try:
        sys.exit(run_up(host, port, flower_port))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@click.argument("path", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["docker", "shell"]), help="Override CICD_EXECUTOR.")
@click.option("--publish", is_flag=True, help="Also build and push the image ci.yaml asks for.")
def run(path: Path, executor: str | None, publish: bool) -> None:
    """Run the ci.yaml of a local checkout here, without a server; exit with its status."""
    # The build runs in the worker's code: a process of its own (workers.localrun),
    # as `cicd worker` is, so the command line never imports the worker side.
    env = {**os.environ, **({"CICD_EXECUTOR": executor} if executor else {})}
    args = [sys.executable, "-m", "workers.localrun", str(path), *(["--publish"] * publish)]
    os.execve(sys.executable, args, env)


# --- watching builds and the fleet, through the REST API --------------------------------------

api_url_option = click.option(
    "--url",
    callback=lambda _ctx, _param, url: url or _settings().api_url,
    help="Base URL of the OpsCD web process  [default: CICD_API_URL, else http://127.0.0.1:8000]",
)


def _http() -> requests.Session:
    """A client that logs in to the API like the web pages do, when a login is configured."""
    import requests

    settings = _settings()
    session = requests.Session()
    session.headers["X-Requested-With"] = "cicd"
    if settings.api_token and settings.api_token.get_secret_value():
        session.headers["Authorization"] = f"Bearer {settings.api_token.get_secret_value()}"
    elif settings.ui_password and settings.ui_password.get_secret_value():
        session.auth = (settings.ui_user, settings.ui_password.get_secret_value())
    return session


def _get(url: str, path: str, **params: object) -> dict:
    return _send("get", url, path, params=params)


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


@main.group(invoke_without_command=True)
@api_url_option
@click.pass_context
def agents(context: click.Context, url: str) -> None:
    """List worker nodes (online or not, builds running, load, last heartbeat, which registered
    agent they log in as) and registered agents; or manage agents (see the commands)."""
    if context.invoked_subcommand is not None:
        return
    answer = _get(url, "/api/agents")
    rows = answer["agents"]
    for row in rows:
        row["status"] = "online" if row["online"] else "offline"
        if row.get("refused"):
            row["status"] += f" (takes no builds: {row['refused']})"
        row["running"] = f"{row['active']}/{row['concurrency']}"
        row["heartbeat"] = f"{row['seconds_since_heartbeat']:.0f}s ago"
        row["identity"] = row.get("agent") or "-"
    columns = [("AGENT", "hostname"), ("STATUS", "status"), ("RUNNING", "running"),
               ("PROCESSED", "processed"), ("LOAD", "loadavg"), ("HEARTBEAT", "heartbeat"),
               ("VERSION", "sw_version"), ("IDENTITY", "identity")]  # fmt: skip
    click.echo(_table(rows, columns))
    registered = answer.get("registered") or []
    if registered:
        for row in registered:
            row["node_list"] = ", ".join(row["nodes"]) or "-"
            row["broker"] = {None: "unknown", True: "present", False: "missing"}[row["broker_user"]]
        click.echo()
        click.echo(_table(registered, [("REGISTERED AGENT", "name"), ("STATE", "state"),
                                       ("NODES", "node_list"), ("BROKER USER", "broker"),
                                       ("REFUSED LOGINS", "refused_logins")]))  # fmt: skip
    for entry in answer.get("refused_unknown") or []:
        click.echo(f"the broker refused {entry['count']} login(s) as unknown account "
                   f"{entry['account']}", err=True)  # fmt: skip


def _agent_admin(action: Callable[..., Any], *args: Any) -> Any:
    """Run an agents change with this host's settings (a database login that may create users
    and grant, a Redis login that may manage ACL users), not through the web."""
    from sqlalchemy.exc import DBAPIError

    from cicd import db

    settings = _settings()
    try:
        settings.require("database_url", "broker_url")
        db.configure(settings)
        with db.session() as session:
            return action(session, settings, *args)
    except OpsCDError as error:
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        raise click.ClickException(f"the database refused: {error.orig}") from None


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@agents.command("add")
@click.argument("name")
def agents_add(name: str) -> None:
    """Register agent NAME with a broker user and a database user of its own; prints its
    worker settings (shown once: the token is not kept)."""
    from cicd import agents as registry

    issued, warnings = _agent_admin(registry.add, name)
    _warn(warnings)
    click.echo(f"agent {name} registered; start its worker nodes with these settings "
               "(use the control host's address where an agent does not reach it as here):",
               err=True)  # fmt: skip
    for key, value in issued.environment(_settings()).items():
        click.echo(f"{key}={shlex.quote(value)}")


@agents.command("disable")
@click.argument("name")
def agents_disable(name: str) -> None:
    """Stop new builds to agent NAME within one heartbeat; builds it runs go on."""
    from cicd import agents as registry

    _agent_admin(lambda session, _settings, n: registry.set_enabled(session, n, False), name)
    click.echo(f"agent {name} disabled: it takes no new builds (builds it runs go on)")


@agents.command("enable")
@click.argument("name")
def agents_enable(name: str) -> None:
    """Let a disabled agent NAME take builds again."""
    from cicd import agents as registry

    _agent_admin(lambda session, _settings, n: registry.set_enabled(session, n, True), name)
    click.echo(f"agent {name} enabled")


@agents.command("revoke")
@click.argument("name")
def agents_revoke(name: str) -> None:
    """Delete agent NAME's credentials and cut its connections now: its nodes can do nothing
    more, and builds they ran run again on other nodes."""
    from cicd import agents as registry

    _agent, warnings = _agent_admin(registry.revoke, name)
    _warn(warnings)
    click.echo(f"agent {name} revoked: its broker and database users are deleted")


@agents.command("sync")
def agents_sync() -> None:
    """Make every registered agent's broker user and grants again (after a Redis restart
    without an aclfile, or an upgrade that added tables)."""
    from cicd import agents as registry

    names, warnings = _agent_admin(registry.sync)
    _warn(warnings)
    click.echo(f"synced {len(names)} agent(s): {', '.join(names) or '-'}")


_COLOUR = re.compile(r"(\x1b\[[0-9;]{0,32}m)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """Build output as it may reach a terminal: colours (SGR) kept, every other control
    character shown as ``\\xNN`` (a build must not retitle, clear or reprogram the terminal
    of whoever reads its log)."""
    parts = _COLOUR.split(text)  # odd items are the colour sequences
    return "".join(
        part if index % 2 else _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", part)
        for index, part in enumerate(parts)
    )


@main.command()
@api_url_option
@click.argument("task_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the build ends.")
@click.option("--step", help="Only this step's section of the log.")
def logs(url: str, task_id: int, follow: bool, step: str | None) -> None:
    """Print a build's log; with --follow, live until it ends, then exit with its result."""

    endpoint = f"{url.rstrip('/')}/api/tasks/{task_id}/log"
    if not follow:
        response = _http().get(endpoint, params={"step": step} if step else None, timeout=30)
        if response.status_code == 404:
            raise click.ClickException(response.json().get("error") or f"no task {task_id}")
        click.echo(terminal_safe(response.text), nl=False)
        return
    state = _follow_log(endpoint, step)
    click.echo(f"\n[build {task_id} ended: {state}]", err=True)
    sys.exit(0 if state == "success" else 1)


def _follow_log(endpoint: str, step: str | None = None) -> str | None:
    """Print a build's log as the server streams it (SSE); return the final state. With
    ``step``, only that step's output (its ``step`` events).

    The server ends each stream after a while (or at once when it serves many): like
    EventSource, this reconnects with the last event's id until the ``end`` event.
    """
    import time

    last_id = None
    http = _http()
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        with http.get(endpoint, params={"follow": 1}, headers=headers, stream=True,
                      timeout=(10, 120)) as response:  # fmt: skip
            if response.status_code == 404:
                raise click.ClickException(f"no such task: {endpoint}")
            event, data, event_id, retry = None, [], None, 1.0
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("retry: ") and line[7:].isdecimal():
                    retry = int(line[7:]) / 1000
                elif line.startswith("data: ") or line == "data:":
                    data.append(line[6:])
                elif not line:
                    if event == "end":
                        return data[0] if data else None
                    named = data.pop(0) if event == "step" and data else None
                    if data and (step is None or named == step):
                        click.echo(terminal_safe("\n".join(data)), nl=False)
                    last_id = event_id or last_id
                    event, data = None, []
        time.sleep(retry)


@main.command()
@api_url_option
@click.argument("path", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the build's log to its end and exit with its result.")  # fmt: skip
def trigger(url: str, path: Path, wait: bool) -> None:
    """Send a GitLab push webhook for a local repository (or folder) to a running OpsCD.

    The folder is built as project local/<folder name>, registered on first use.
    """
    from cicd.errors import OpsCDError
    from cicd.trigger import project_path, push_payload, send_push, served

    try:
        with served(path) as (local, clone_url):
            click.echo(f"Serving {local.name} at {clone_url} ({local.branch} {local.sha[:8]})")
            secret = _register_local(url, project_path(local.name), clone_url)
            answer = send_push(url, secret, push_payload(local, clone_url))
            task_id = answer.get("task_id")
            if "ignored" in answer or task_id is None:
                raise click.ClickException(f"nothing to build: {answer}")
            click.echo(f"Build {task_id} queued: {answer.get('url')}")
            endpoint = f"{url.rstrip('/')}/api/tasks/{task_id}"
            if wait:
                state = _follow_log(endpoint + "/log")
                click.echo(f"\n[build {task_id} ended: {state}]", err=True)
                sys.exit(0 if state == "success" else 1)
            _wait_for_clone(endpoint)  # the worker must fetch before the server goes
    except OpsCDError as error:
        raise click.ClickException(str(error)) from None


def _register_local(url: str, project: str, clone_url: str) -> str:
    """A webhook secret for the local project: registered on first use; later its clone URL
    (served on a new port each time) is updated and a new secret made for this push."""
    import requests

    body = {"project": project, "clone_url": clone_url}
    try:
        response = _http().post(url.rstrip("/") + "/api/projects", json=body, timeout=10)
    except requests.RequestException as error:
        raise click.ClickException(f"cannot reach OpsCD at {url}: {error}") from None
    if response.status_code == 201:
        click.echo(f"Registered {project} on first use (see: cicd projects show {project})")
        return response.json()["webhook_secret"]
    if response.status_code != 409:
        raise click.ClickException(f"registering {project}: {_failure(response)}")
    _send("patch", url, f"/api/projects/{project}", json={"clone_url": clone_url})
    return _send("post", url, f"/api/projects/{project}/rotate-secret")["webhook_secret"]


def _wait_for_clone(endpoint: str, timeout: float = 600) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = _http().get(endpoint, timeout=10).json()
        clone = next((s for s in task.get("stages", []) if s["stage"] == "clone"), None)
        if task["state"] in ("success", "failed", "canceled") or (
            clone and clone["state"] not in (None, "running")
        ):
            return
        time.sleep(0.5)


@main.group(name="secrets")
def secrets_group() -> None:
    """Manage a project's secret variables (stored encrypted; values are never shown)."""


def _failure(response: requests.Response) -> str:
    """``STATUS: the API's error message`` of a refused request."""
    is_json = response.headers.get("Content-Type", "").startswith("application/json")
    message = response.json().get("error") if is_json else response.text
    return f"{response.status_code}: {message}"


def _send(method: str, url: str, path: str, **kwargs: object) -> dict:
    import requests

    try:
        response = _http().request(method, url.rstrip("/") + path, timeout=10, **kwargs)
    except requests.RequestException as error:
        raise click.ClickException(f"cannot reach OpsCD at {url}: {error}") from None
    if not response.ok:
        raise click.ClickException(_failure(response))
    return response.json() if response.content else {}


@secrets_group.command(name="set")
@api_url_option
@click.argument("project")
@click.argument("name")
@click.option("--value", help="The value (default: read from standard input or a prompt).")
def secrets_set(url: str, project: str, name: str, value: str | None) -> None:
    """Set secret NAME of PROJECT (e.g. group/app)."""
    if value is None:
        if sys.stdin.isatty():
            value = click.prompt(f"Value of {name}", hide_input=True, confirmation_prompt=True)
        else:
            value = sys.stdin.read().rstrip("\n")
    answer = _send("put", url, f"/api/projects/{project}/secrets/{name}", json={"value": value})
    click.echo(f"{'added' if answer.get('created') else 'updated'} {name} in {project}")


@secrets_group.command(name="list")
@api_url_option
@click.argument("project")
def secrets_list(url: str, project: str) -> None:
    """List the secret names of PROJECT (never their values)."""
    rows = _send("get", url, f"/api/projects/{project}/secrets")["secrets"]
    click.echo(_table(rows, [("NAME", "name"), ("UPDATED", "updated_at")]))


@secrets_group.command(name="rm")
@api_url_option
@click.argument("project")
@click.argument("name")
def secrets_rm(url: str, project: str, name: str) -> None:
    """Delete secret NAME of PROJECT."""
    _send("delete", url, f"/api/projects/{project}/secrets/{name}")
    click.echo(f"removed {name} from {project}")


@main.group(name="cache")
def cache_group() -> None:
    """The dependency caches agents keep per project (ci.yaml cache:, the Java default)."""


@cache_group.command(name="list")
@api_url_option
@click.argument("project")
def cache_list(url: str, project: str) -> None:
    """List the caches of PROJECT on every agent, most recently used first."""
    rows = _send("get", url, f"/api/projects/{project}/caches")["caches"]
    for row in rows:
        row["size"] = f"{row['size_bytes'] / 1024**2:.1f} MiB"
    click.echo(_table(rows, [("KEY", "key"), ("SIZE", "size"), ("NODE", "node"),
                             ("BUILD", "task_id"), ("SAVED", "saved_at"),
                             ("USED", "used_at")]))  # fmt: skip


@cache_group.command(name="clear")
@api_url_option
@click.argument("project")
def cache_clear(url: str, project: str) -> None:
    """Clear the caches of PROJECT on every agent: the next builds start cold."""
    cleared = _send("delete", url, f"/api/projects/{project}/caches")["cleared"]
    click.echo(f"cleared {cleared} cache(s) of {project}; agents remove the files at their "
               "next build")  # fmt: skip


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print {project, webhook_url, webhook_secret}."
)


@main.group(name="projects")
def projects_group() -> None:
    """Register the projects OpsCD builds (path, clone URL, webhook secret, ref policy)."""


def _from_stdin(git_password: bool, api_token: bool) -> tuple[str | None, str | None]:
    """The git password and the API token asked for on standard input: each one line, the
    password's first when both are asked for."""
    if not git_password and not api_token:
        return None, None
    lines = sys.stdin.read().splitlines()
    wanted = int(git_password) + int(api_token)
    if len(lines) < wanted:
        names = [name for name, asked in (("the git password", git_password),
                                          ("the API token", api_token)) if asked]  # fmt: skip
        raise click.UsageError(f"standard input must hold {wanted} line(s): {' then '.join(names)}")
    password = lines.pop(0) if git_password else None
    return password, lines[0] if api_token else None


api_url_options = [
    click.option("--api-url", "forge_api_url",
                 help="The forge's base URL for commit statuses (default: the clone URL's "
                      "origin; OpsCD adds /api/v4, GitHub's /api/v3, Gitea's /api/v1)."),
    click.option("--api-token-stdin", is_flag=True,
                 help="Read a forge access token (one line) from stdin: builds then post "
                      "commit statuses."),
]  # fmt: skip


fork_mrs_option = click.option(
    "--fork-mrs", type=click.Choice(FORK_MRS),
    help="Merge requests from forks that are not registered: not built (off, the default), or "
         "built without secrets and publishing nothing (no-secrets).",
)  # fmt: skip


def forge_api_options(command):
    for option in reversed(api_url_options):
        command = option(command)
    return command


def _show_registered(answer: dict, as_json: bool, what: str) -> None:
    """The webhook URL and secret, shown this once."""
    if as_json:
        click.echo(json.dumps({"project": answer["project"]["project"],
                               "webhook_url": answer["webhook_url"],
                               "webhook_secret": answer["webhook_secret"]}))  # fmt: skip
        return
    click.echo(f"{what} {answer['project']['project']}")
    click.echo(f"webhook URL:    {answer['webhook_url']}")
    click.echo(f"webhook secret: {answer['webhook_secret']}")
    click.echo("(the secret is shown only now: put it in the forge's webhook settings)")


@projects_group.command(name="add")
@api_url_option
@click.argument("project")
@click.option("--clone-url", required=True, help="Where builds clone it from (http or https).")
@click.option(
    "--protected",
    default="main",
    show_default=True,
    help="Ref patterns whose builds get the secret variables, comma-separated.",
)
@click.option("--approval", default="", help="Ref patterns whose publish waits for approval.")
@click.option("--forge", type=click.Choice(FORGES), default="gitlab", show_default=True,
              help="Where it is hosted: its webhooks go to /webhooks/FORGE.")  # fmt: skip
@fork_mrs_option
@click.option("--git-username", help="Its own git user (else the instance's CICD_GIT_USERNAME).")
@click.option("--git-password-stdin", is_flag=True, help="Read its own git password from stdin.")
@forge_api_options
@json_option
def projects_add(
    url: str,
    project: str,
    clone_url: str,
    protected: str,
    approval: str,
    forge: str,
    fork_mrs: str | None,
    git_username: str | None,
    git_password_stdin: bool,
    forge_api_url: str | None,
    api_token_stdin: bool,
    as_json: bool,
) -> None:
    """Register PROJECT (group/app, or group/* for a group webhook; GitHub's and Gitea's
    owner/repo)."""
    body = {"project": project, "clone_url": clone_url, "protected": protected,
            "approval": approval, "forge": forge, "fork_mrs": fork_mrs or "off"}  # fmt: skip
    password, token = _from_stdin(git_password_stdin, api_token_stdin)
    if git_username is not None or git_password_stdin:
        body.update(git_username=git_username, git_password=password)
    if forge_api_url is not None:
        body["api_url"] = forge_api_url
    if token is not None:
        body["api_token"] = token
    _show_registered(_send("post", url, "/api/projects", json=body), as_json, "registered")


@projects_group.command(name="list")
@api_url_option
def projects_list(url: str) -> None:
    """Every registered project."""
    rows = _send("get", url, "/api/projects")["projects"]
    for row in rows:
        row["protected"] = ",".join(row["protected"])
    click.echo(_table(rows, [("PROJECT", "project"), ("CLONE URL", "clone_url"),
                             ("PROTECTED", "protected"), ("UPDATED", "updated_at")]))  # fmt: skip


@projects_group.command(name="show")
@api_url_option
@click.argument("project")
def projects_show(url: str, project: str) -> None:
    """One registration, as JSON (never its secret)."""
    click.echo(json.dumps(_send("get", url, f"/api/projects/{project}"), indent=2))


@projects_group.command(name="set")
@api_url_option
@click.argument("project")
@click.option("--clone-url", help="A new clone URL.")
@click.option("--protected", help="New protected ref patterns.")
@click.option("--approval", help="New approval ref patterns ('' for none).")
@click.option("--git-username", help="Its own git user (with --git-password-stdin).")
@click.option("--git-password-stdin", is_flag=True, help="Read its own git password from stdin.")
@click.option("--instance-git", is_flag=True, help="Drop its own git credentials.")
@fork_mrs_option
@forge_api_options
@click.option("--no-statuses", is_flag=True, help="Drop its API token: post no more statuses.")
def projects_set(url: str, project: str, clone_url: str | None, protected: str | None,
                 approval: str | None, git_username: str | None, git_password_stdin: bool,
                 instance_git: bool, fork_mrs: str | None, forge_api_url: str | None,
                 api_token_stdin: bool, no_statuses: bool) -> None:  # fmt: skip
    """Change PROJECT's registration."""
    changes: dict[str, str | None] = {
        key: value for key, value in
        (("clone_url", clone_url), ("protected", protected), ("approval", approval),
         ("fork_mrs", fork_mrs))
        if value is not None
    }  # fmt: skip
    password, token = _from_stdin(git_password_stdin and not instance_git, api_token_stdin)
    if instance_git:
        changes.update(git_username=None, git_password=None)
    elif git_username is not None or git_password_stdin:
        changes.update(git_username=git_username, git_password=password)
    if forge_api_url is not None:
        changes["api_url"] = forge_api_url
    if no_statuses:
        changes["api_token"] = None
    elif token is not None:
        changes["api_token"] = token
    if not changes:
        raise click.UsageError("nothing to change: give at least one option")
    answer = _send("patch", url, f"/api/projects/{project}", json=changes)
    click.echo(f"updated {answer['project']}")


@projects_group.command(name="rotate-secret")
@api_url_option
@click.argument("project")
@json_option
def projects_rotate_secret(url: str, project: str, as_json: bool) -> None:
    """A new webhook secret for PROJECT; the old one stops working now."""
    answer = _send("post", url, f"/api/projects/{project}/rotate-secret")
    _show_registered(answer, as_json, "new secret for")


@projects_group.command(name="rm")
@api_url_option
@click.argument("project")
def projects_rm(url: str, project: str) -> None:
    """Unregister PROJECT (its builds stay)."""
    _send("delete", url, f"/api/projects/{project}")
    click.echo(f"unregistered {project}")


if __name__ == "__main__":
    main()
