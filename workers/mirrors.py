"""Warm checkouts: a bare git mirror per registered clone URL on each agent
(``CICD_CACHE_DIR/git/``), so a build that wants history (``clone: {depth: full}`` or a
number) fetches from the forge only what is new since the last build.

The mirror is refreshed under a lock (one build at a time per repository on an agent;
the others wait for it, then find it fresh). The checkout then copies what it needs out
of the mirror (a fetch over the local ``file`` transport, not alternates), so a mirror
that is garbage-collected, rebuilt or deleted later never breaks a checkout. A mirror git
cannot use is removed and made again; if even that fails, the caller fetches from the
forge directly: a mirror never fails a build.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cicd.config import Settings

__all__ = ["mirror_path", "locked", "remove"]


def mirror_path(settings: Settings, clone_url: str) -> Path:
    """Where the mirror of ``clone_url`` lives: named by the URL's digest, so no URL (of
    any project) can name a path of its choosing."""
    digest = hashlib.sha256(clone_url.encode()).hexdigest()[:32]
    return settings.cache_dir / "git" / f"{digest}.git"


@contextmanager
def locked(mirror: Path) -> Iterator[None]:
    """Hold the mirror's lock (an ``flock`` beside it, released if the process dies)."""
    mirror.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(mirror.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove(mirror: Path) -> None:
    """Drop a mirror git could not use (under its lock): the next refresh makes it again."""
    shutil.rmtree(mirror, ignore_errors=True)
