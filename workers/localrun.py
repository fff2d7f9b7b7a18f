"""``cicd run``: a local checkout's ci.yaml through the same stages and executors, on this machine.

Like ``gitlab-runner exec`` or ``woodpecker exec``: no server, no database, no
broker. The working tree is copied as it is (tracked files and untracked ones
git does not ignore), so uncommitted changes are built; the log goes to the
terminal, masked like any build log; the exit status is the build's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from cicd.config import load_settings
from cicd.errors import BuildFailed, ConfigError, OpsCDError
from cicd.secrets import SecretError
from cicd.worktree import copy_tree, git_output
from workers.executors import get_executor
from workers.logs import LogWriter
from workers.stages import masker
from workers.stages.build import run_build
from workers.stages.publish import run_publish

__all__ = ["main", "run_local"]


def run_local(path: Path, publish: bool = False) -> int:
    """Run the pipeline of ``path``; return the process exit status (0 for success)."""
    path = path.resolve()
    if not path.is_dir():
        raise click.ClickException(f"{path} is not a folder")
    variables = _variables(path)
    with tempfile.TemporaryDirectory(prefix="opscd-run-") as workspace:
        checkout = Path(workspace) / "src"
        (Path(workspace) / "home").mkdir()
        try:
            with _stage("clone"):
                count = copy_tree(path, checkout)
                click.echo(f"Copied {count} files from {path}")
            with _stage("build"), _terminal_log() as log:
                pipeline = run_build(
                    checkout, variables, get_executor(load_settings(), "local"), log,
                    secrets=_secrets_from_environment,
                )  # fmt: skip
            if pipeline.publish is None:
                _skipped("publish", "ci.yaml has no publish section")
            elif not publish:
                _skipped("publish", "run with --publish to build and push the image")
            else:
                with _stage("publish"), _terminal_log() as log:
                    run_publish(pipeline.publish, checkout, variables, log, protected=True)
        except BuildFailed as error:
            code = error.exit_code
            return code if isinstance(code, int) and 0 < code < 256 else 1
        except OpsCDError:
            return 1
    return 0


@contextmanager
def _stage(name: str) -> Iterator[None]:
    """A header before the stage, its result and duration after: the progress display."""
    click.secho(f"━━ {name} ", fg="cyan", bold=True, err=True)
    started = time.monotonic()
    try:
        yield
    except OpsCDError as error:
        took = time.monotonic() - started
        click.secho(f"✗ {name} failed after {took:.1f}s: {masker()(str(error))}", fg="red",
                    bold=True, err=True)  # fmt: skip
        raise
    click.secho(f"✓ {name} ({time.monotonic() - started:.1f}s)", fg="green", bold=True, err=True)


def _secrets_from_environment(names: list[str]) -> dict[str, str]:
    """Locally, ci.yaml's secrets come from this shell's environment, under the same names."""
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        raise SecretError(f"ci.yaml asks for secret(s) {', '.join(missing)}: export them first")
    return {name: os.environ[name] for name in names}


def _skipped(name: str, why: str) -> None:
    click.secho(f"━━ {name} ", fg="cyan", bold=True, err=True)
    click.secho(f"- {name} skipped: {why}", fg="yellow", err=True)


@contextmanager
def _terminal_log() -> Iterator[LogWriter]:
    def store(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with LogWriter(store, masker()) as log:
        yield log


def _variables(path: Path) -> dict[str, str]:
    sha = git_output(path, "rev-parse", "HEAD") or "0" * 40
    branch = git_output(path, "symbolic-ref", "--quiet", "--short", "HEAD") or "local"
    return {
        "CI": "true",
        "OPSCD": "true",
        "CI_TASK_ID": "local",
        "CI_PROJECT_PATH": f"local/{path.name}",
        "CI_COMMIT_SHA": sha,
        "CI_COMMIT_SHORT_SHA": sha[:8],
        "CI_COMMIT_REF_NAME": branch,
        "CI_COMMIT_BRANCH": branch,
    }


@click.command()
@click.argument("path", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--publish", is_flag=True, help="Also build and push the image ci.yaml asks for.")
def main(path: Path, publish: bool) -> None:
    """``cicd run``: the ci.yaml of a local checkout, run here; exits with its status."""
    try:
        load_settings()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    sys.exit(run_local(path, publish=publish))


if __name__ == "__main__":
    main()
