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

from cicd.config import load_settings

__all__ = ["create_workspace", "remove_workspace", "checkout_dir"]


def create_workspace(task_id: int) -> Path:
    """A new, empty workspace for one run of ``task_id``; two runs never share one."""
    root = load_settings().workspace_dir
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    workspace = Path(tempfile.mkdtemp(prefix=f"task-{int(task_id)}-", dir=root))
    checkout_dir(workspace).mkdir()
    return workspace


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
