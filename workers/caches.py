"""Dependency caches: directories of the checkout (``ci.yaml`` ``cache:``, or a language
default's, Maven's ``.m2/repository``) kept between builds of a project on each agent.

A cache is one tar file per (project, key) in ``CICD_CACHE_DIR/deps/``, named by a
digest (no project or key can name a path of its choosing). It is restored into the
checkout before the steps and saved after a successful build, but only by builds of
the project's protected refs: a pushed branch reads the cache of its key, or of the
project's main branch when its own has none, and never writes one, so it cannot poison
what ``main`` restores.

Readers never see half a cache: a save writes a temporary file in the same folder and
renames it over the old one, and a reader that opened the old file reads it whole
(its inode lives until closed). Past ``CICD_CACHE_MAX_BYTES`` the least recently used
files (a restore touches its file) are removed under a lock.

The database has a row per cache file (:class:`~cicd.models.ProjectCache`), written by
the agent, so ``cicd cache list`` sees caches that live on other hosts' disks, and
``cicd cache clear`` (deleting the rows) clears them everywhere: a file is restored
only while its row exists. A cache never fails a build: whatever goes wrong is said in
the log, and the build goes on without it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from cicd import db
from cicd.ciyaml import Pipeline
from cicd.config import Settings
from cicd.languages import LANGUAGES
from cicd.models import ProjectCache, utcnow
from workers.logs import LogWriter

__all__ = ["BuildCache", "CachePlan", "plan", "store_root", "store_id", "evict"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: A temporary file older than this is a save that died with its node.
STALE_SECONDS = 3600
#: A file without a row is a cleared cache once it is this old (a save renames its file
#: a moment before it writes the row).
ORPHAN_SECONDS = 600


@dataclass(frozen=True)
class CachePlan:
    """What one build keeps: directories of its checkout (relative), under which key, the
    key it reads when its own has no cache, and the variables that make a language
    default's tool use those directories."""

    paths: tuple[str, ...]
    key: str
    fallback: str | None
    source: str
    environment: dict[str, str] = field(default_factory=dict)
    #: A language default's directories leave the checkout once kept: the build did not
    #: ask for them, and the image build's context (the checkout) must not carry them.
    remove_after: bool = False


def _keeps_own_maven_repository(settings: Settings) -> bool:
    """The agent's ``settings.xml`` names a ``localRepository``: the operator keeps a shared
    Maven repository on the agent, which the Java default then uses as it is."""
    if settings.maven_settings is None:
        return False
    try:
        # The operator's own file on the agent, not a repository's.
        root = ElementTree.parse(settings.maven_settings).getroot()  # noqa: S314
    except (OSError, ElementTree.ParseError):
        return False
    return any(
        element.tag.rpartition("}")[2] == "localRepository" and (element.text or "").strip()
        for element in root
    )


def plan(
    pipeline: Pipeline, settings: Settings, ref_name: str, fallback: str | None
) -> CachePlan | None:
    """The build's cache: ``ci.yaml``'s ``cache:``, else its language defaults' (steps
    that run a language's default script), else none. The key defaults to the ref name."""
    spec = pipeline.cache
    if spec is not None:
        if not spec.enabled:
            return None
        key = spec.key or ref_name
        return CachePlan(spec.paths, key, _other(fallback, key), "ci.yaml cache:")
    paths: dict[str, None] = {}
    environment: dict[str, str] = {}
    languages: dict[str, None] = {}
    for step in pipeline.steps_to_run:
        defaults = LANGUAGES.get(step.language or "")
        if step.commands is not None or defaults is None or not defaults.cache:
            continue
        if step.language == "java" and _keeps_own_maven_repository(settings):
            continue
        for path in defaults.cache:
            paths[posixpath.normpath(posixpath.join(step.directory, path))] = None
        environment.update(defaults.cache_environment)
        languages[step.language or ""] = None
    if not paths:
        return None
    source = f"the {', '.join(languages)} default"
    return CachePlan(tuple(paths), ref_name, _other(fallback, ref_name), source, environment,
                     remove_after=True)  # fmt: skip


def _other(fallback: str | None, key: str) -> str | None:
    return fallback if fallback not in (None, key) else None


# --- the store on this agent's disk ---------------------------------------------------------


def store_root(settings: Settings) -> Path:
    """The folder of this agent's dependency caches."""
    root = settings.cache_dir / "deps"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def store_id(root: Path) -> str:
    """The store's name in the database, made once: several nodes of one host that share a
    ``CICD_CACHE_DIR`` share its caches and their rows."""
    marker = root / ".store-id"
    try:
        with open(marker, "x") as created:
            created.write(uuid.uuid4().hex)
    except FileExistsError:
        pass
    for _ in range(50):  # another node may be between creating and writing it
        name = marker.read_text().strip()
        if name:
            return name
        time.sleep(0.01)
    raise OSError(f"{marker} is empty")


def _digest(project: str, key: str) -> str:
    return hashlib.sha256(f"{project}\0{key}".encode()).hexdigest()[:40]


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def evict(root: Path, store: str, max_bytes: int, keep: Path | None = None) -> list[str]:
    """Remove least recently used cache files until the store holds at most ``max_bytes``
    (never ``keep``, the one just saved), and files whose rows were deleted (cleared
    caches) or saves that died; return the digests removed."""
    now = time.time()
    removed: list[str] = []
    try:
        known = _stored_digests(store)
    except SQLAlchemyError as error:
        log.warning("cache store %s: rows unreadable (%s); only the size bound applies", store,
                    error)  # fmt: skip
        known = None
    with _locked(root):
        files = []
        for path in root.iterdir():
            try:
                status = path.stat()
            except FileNotFoundError:
                continue
            if path.name.startswith(".tmp-"):
                if now - status.st_mtime > STALE_SECONDS:
                    path.unlink(missing_ok=True)
            elif path.suffix == ".tar":
                orphan = known is not None and path.stem not in known
                if orphan and path != keep and now - status.st_mtime > ORPHAN_SECONDS:
                    path.unlink(missing_ok=True)
                    removed.append(path.stem)
                else:
                    files.append((status.st_mtime, status.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda entry: entry[0]):
            if total <= max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            removed.append(path.stem)
            total -= size
    if removed:
        _forget(store, removed)
    return removed


# --- the rows ------------------------------------------------------------------------------


def _stored_digests(store: str) -> set[str]:
    with db.session() as session:
        return set(session.scalars(select(ProjectCache.digest).where(ProjectCache.store == store)))


def _forget(store: str, digests: list[str]) -> None:
    try:
        with db.session() as session:
            session.execute(
                delete(ProjectCache).where(
                    ProjectCache.store == store, ProjectCache.digest.in_(digests)
                )
            )
            session.commit()
    except SQLAlchemyError as error:
        log.warning("cache store %s: rows of removed caches not deleted: %s", store, error)


def _row(store: str, digest: str) -> ProjectCache | None:
    with db.session() as session:
        row = session.get(ProjectCache, (store, digest))
        if row is not None:
            session.execute(
                update(ProjectCache)
                .where(ProjectCache.store == store, ProjectCache.digest == digest)
                .values(used_at=utcnow())
            )
            session.commit()
            session.expunge(row)
        return row


def _record(row: ProjectCache) -> None:
    """Insert the row of a saved cache, or replace what the one before said."""
    values = {
        "project": row.project, "cache_key": row.cache_key, "size_bytes": row.size_bytes,
        "node": row.node, "task_id": row.task_id, "saved_at": row.saved_at,
        "used_at": row.used_at,
    }  # fmt: skip
    where = (ProjectCache.store == row.store, ProjectCache.digest == row.digest)
    with db.session() as session:
        if session.execute(update(ProjectCache).where(*where).values(**values)).rowcount == 0:
            session.add(row)
            try:
                session.commit()
                return
            except IntegrityError:  # another node of this store saved it meanwhile
                session.rollback()
                session.execute(update(ProjectCache).where(*where).values(**values))
        session.commit()


# --- one build's cache ---------------------------------------------------------------------


def _size(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB / 10 else f"{size} bytes"


def _inside(checkout: Path, relative: str) -> Path | None:
    """The directory ``relative`` names in the checkout, or None if it is not a directory
    there or leads out of it (a symlink the build or the repository made)."""
    path = checkout / relative
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(checkout.resolve()) or path.is_symlink() or not real.is_dir():
        return None
    return path


def _kept_inside(left_out: list[str]) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    """Python's ``data`` filter, member by member: what would land outside the checkout (a
    link to an absolute path, a directory the repository made a symlink) is left out (its
    name added to ``left_out``), and the rest restored."""

    def kept(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
        try:
            return tarfile.data_filter(member, destination)
        except tarfile.FilterError:
            left_out.append(member.name)
            return None

    return kept


def _remove(checkout: Path, relative: str) -> None:
    """Take a directory out of the checkout, and the folders it leaves empty (``.m2``)."""
    found = _inside(checkout, relative)
    if found is None:
        return
    shutil.rmtree(found, ignore_errors=True)
    for parent in Path(relative).parents:
        if parent == Path("."):
            break
        try:
            (checkout / parent).rmdir()
        except OSError:  # not empty: the repository's own files are in it
            break


def _fingerprint(checkout: Path, paths: tuple[str, ...]) -> str:
    """What the cache directories hold, by name, type, size and modification time (a
    restore keeps each file's time): equal fingerprints need no new save."""
    digest = hashlib.sha256()
    for relative in paths:
        top = _inside(checkout, relative)
        if top is None:
            continue
        for folder, names, files in os.walk(top):
            names.sort()
            for name in sorted(files) + names:
                status = os.lstat(os.path.join(folder, name))
                entry = f"{os.path.relpath(os.path.join(folder, name), checkout)}\0"
                digest.update(f"{entry}{status.st_mode}\0{status.st_size}\0"
                              f"{status.st_mtime_ns}\n".encode())  # fmt: skip
    return digest.hexdigest()


@dataclass
class BuildCache:
    """The cache of one build on this node: what the server's records decide (project, ref,
    the fallback key, whether this build may write) and where the node keeps it."""

    settings: Settings
    project: str
    ref_name: str
    #: The project's main branch (its first protected branch named in full), read when the
    #: build's own key has no cache yet.
    fallback: str | None
    #: Why this build saves nothing (its ref is not protected, a merge request), or None.
    read_only: str | None
    node: str
    task_id: int | None = None
    planned: CachePlan | None = field(default=None, init=False)
    #: What the build's own key's cache looked like once restored (None: not restored).
    restored: str | None = field(default=None, init=False)

    def restore(self, pipeline: Pipeline, checkout: Path, log: LogWriter) -> dict[str, str]:
        """Put the cache of the build's key (else the fallback's) into the checkout; return
        the variables the language default's tool needs to use it."""
        self.planned = plan(pipeline, self.settings, self.ref_name, self.fallback)
        if self.planned is None:
            return {}
        keys = [key for key in (self.planned.key, self.planned.fallback) if key is not None]
        try:
            root = store_root(self.settings)
            store = store_id(root)
            for key in keys:
                if self._restore_key(self.planned, root, store, key, checkout, log):
                    if key == self.planned.key:
                        self.restored = _fingerprint(checkout, self.planned.paths)
                    break
            else:
                named = " or ".join(f'"{key}"' for key in keys)
                log.line(f"Cache ({self.planned.source}): none yet for key {named}")
        except (OSError, SQLAlchemyError) as error:
            log.line(f"Cache not restored ({error}); the build goes on without it")
        return dict(self.planned.environment)

    def _restore_key(
        self, planned: CachePlan, root: Path, store: str, key: str, checkout: Path,
        log: LogWriter,
    ) -> bool:  # fmt: skip
        digest = _digest(self.project, key)
        path = root / f"{digest}.tar"
        row = _row(store, digest)
        if row is None:  # never saved here, or cleared: its file (if any) is stale
            path.unlink(missing_ok=True)
            return False
        started, left_out = time.monotonic(), []
        try:
            with open(path, "rb") as file:
                os.utime(file.fileno())  # recently used: the last to be evicted
                with tarfile.open(fileobj=file, mode="r:") as archive:
                    archive.extractall(checkout, filter=_kept_inside(left_out))  # noqa: S202
        except FileNotFoundError:  # evicted since
            _forget(store, [digest])
            return False
        except (tarfile.TarError, OSError) as error:
            log.line(f'Cache of key "{key}" not restored: {error}; the build goes on without it')
            return True
        by = f" by build #{row.task_id}" if row.task_id is not None else ""
        took = time.monotonic() - started
        log.line(f'Cache restored ({planned.source}): key "{key}", {", ".join(planned.paths)}, '
                 f"{_size(row.size_bytes)} saved{by}, in {took:.1f}s")  # fmt: skip
        if left_out:
            log.line(f"{len(left_out)} of its entries left out, as they would land outside the "
                     f"checkout (a symlink in the repository?), e.g. {left_out[0]}")  # fmt: skip
        return True

    def save(self, checkout: Path, log: LogWriter) -> None:
        """Keep the build's cache directories (the build succeeded), if it may write; then
        take a language default's directories out of the checkout."""
        planned = self.planned
        if planned is None:
            return
        try:
            self._save_if_allowed(planned, checkout, log)
        finally:
            if planned.remove_after:
                for path in planned.paths:
                    _remove(checkout, path)

    def _save_if_allowed(self, planned: CachePlan, checkout: Path, log: LogWriter) -> None:
        if self.read_only is not None:
            log.line(f"Cache not saved: {self.read_only}; such builds read it, only builds of "
                     "protected refs write it")  # fmt: skip
            return
        present = [path for path in planned.paths if _inside(checkout, path) is not None]
        if not present:
            log.line(f"Cache not saved: the build left none of {', '.join(planned.paths)}")
            return
        if self.restored is not None and self.restored == _fingerprint(checkout, planned.paths):
            log.line(f'Cache unchanged since it was restored: key "{planned.key}" kept as it is')
            return
        try:
            self._save(checkout, present, planned, log)
        except (OSError, tarfile.TarError, SQLAlchemyError) as error:
            log.line(f"Cache not saved: {error}")

    def _save(self, checkout: Path, present: list[str], planned: CachePlan, log: LogWriter) -> None:
        started = time.monotonic()
        root = store_root(self.settings)
        store = store_id(root)
        digest = _digest(self.project, planned.key)
        final = root / f"{digest}.tar"
        temporary = root / f".tmp-{uuid.uuid4().hex}"
        try:
            with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
                for path in present:
                    archive.add(checkout / path, arcname=path)
            size = temporary.stat().st_size
            if size > self.settings.cache_max_bytes:
                log.line(f"Cache not saved: {_size(size)} is more than CICD_CACHE_MAX_BYTES "
                         f"({_size(self.settings.cache_max_bytes)})")  # fmt: skip
                return
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)
        now = utcnow()
        _record(ProjectCache(store=store, digest=digest, project=self.project,
                             cache_key=planned.key, size_bytes=size, node=self.node,
                             task_id=self.task_id, saved_at=now, used_at=now))  # fmt: skip
        evicted = evict(root, store, self.settings.cache_max_bytes, keep=final)
        note = f"; {len(evicted)} older cache(s) removed to stay under the bound" if evicted else ""
        log.line(f'Cache saved: key "{planned.key}", {", ".join(present)}, {_size(size)} in '
                 f"{time.monotonic() - started:.1f}s{note}")  # fmt: skip
