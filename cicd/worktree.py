"""A local folder's files, by one rule: what ``cicd run`` builds and ``cicd trigger`` pushes.

What git tracks or would track (``.gitignore`` respected) in a git work tree;
everything but ``.git`` elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

__all__ = ["copy_tree", "git_output"]


def git_output(path: Path, *args: str) -> str | None:
    """``git -C path ARGS``'s output, stripped; None if git fails (e.g. not a work tree)."""
    result = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def copy_tree(source: Path, target: Path) -> int:
    """Copy the working tree: what git tracks or would track, else everything but ``.git``."""
    listed = git_output(source, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed is None:  # not in a git work tree
        ignore: Callable = shutil.ignore_patterns(".git")
        shutil.copytree(source, target, symlinks=True, ignore=ignore)
        return sum(1 for p in target.rglob("*") if p.is_file())
    names = sorted({name for name in listed.split("\0") if name})
    for name in names:
        origin = source / name
        if not origin.exists() and not origin.is_symlink():
            continue  # deleted in the working tree
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, destination, follow_symlinks=False)
    return len(names)
