"""Per-build workspaces: a fresh folder for every build run, removed when it ends.

Layout of one workspace (``CICD_WORKSPACE_DIR/task-<id>-<random>/``):
``src/`` the checkout, ``home/`` the build's ``$HOME``. Paths are made from
the numeric task id and ``mkdtemp`` only, never from a branch or project name,
and removal refuses anything outside ``CICD_WORKSPACE_DIR``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sqlalchemy import select

from cicd import db
from cicd.config import load_settings
from cicd.errors import StageError
from cicd.models import TaskStatus

__all__ = [
    "create_workspace", "workspace_of", "remove_workspace", "checkout_dir",
    "remove_finished_workspaces",
]  # fmt: skip


def create_workspace(task_id: int) -> Path:
    """A new, empty workspace for one run of ``task_id``; two runs never share one."""
    root = load_settings().workspace_dir
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    workspace = Path(tempfile.mkdtemp(prefix=f"task-{int(task_id)}-", dir=root))
    checkout_dir(workspace).mkdir()
    return workspace


def workspace_of(task_id: int, workspace: str | Path | None) -> Path:
    """``workspace`` if it is a workspace of ``task_id`` under ``CICD_WORKSPACE_DIR`` here."""
    root = load_settings().workspace_dir.resolve()
    path = Path(workspace or "").resolve()
    if (
        path.parent != root
        or not path.name.startswith(f"task-{int(task_id)}-")
        or not (path.is_dir())
    ):
        raise StageError("workspace", f"{workspace!r} is not a workspace of build {task_id} "
                         "on this agent")  # fmt: skip
    return path


def checkout_dir(workspace: Path) -> Path:
    return workspace / "src"


def remove_workspace(workspace: str | Path | None) -> None:
    """Delete a workspace made by :func:`create_workspace`; anything else is left alone."""
    if not workspace:
        return
    root = load_settings().workspace_dir.resolve()
    path = Path(workspace).resolve()
    if path.parent != root or not path.name.startswith("task-"):
        raise ValueError(f"refusing to remove {path}: not a workspace under {root}")
    shutil.rmtree(path, ignore_errors=True)


def remove_finished_workspaces() -> int:
    """At a node's start: workspaces of builds that ended (a crash left them) are removed.

    Builds still queued or running keep theirs: several nodes may share one
    host and one ``CICD_WORKSPACE_DIR``.
    """
    root = load_settings().workspace_dir
    if not root.is_dir():
        return 0
    by_task: dict[int, list[Path]] = {}
    for path in root.iterdir():
        parts = path.name.split("-")
        if path.is_dir() and len(parts) >= 3 and parts[0] == "task" and parts[1].isdigit():
            by_task.setdefault(int(parts[1]), []).append(path)
    if not by_task:
        return 0
    with db.session() as session:
        states = dict(
            session.execute(
                select(TaskStatus.task_id, TaskStatus.state).where(TaskStatus.task_id.in_(by_task))
            ).all()
        )
    removed = 0
    for task_id, paths in by_task.items():
        state = states.get(task_id)
        if state is None or state.finished:
            for path in paths:
                remove_workspace(path)
                removed += 1
    return removed
