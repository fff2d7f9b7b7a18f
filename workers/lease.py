"""The node's lease on its builds: they run only while its heartbeats reach the database.

Another node's reaper runs a build again once the build's node has written no
heartbeat for ``CICD_AGENT_OFFLINE_AFTER`` on the database's clock
(:mod:`workers.reaper`). So that two runs of a build never execute at once,
this node stops its own builds' scripts *before* that: each heartbeat that
reaches the database renews the lease until (the moment the node sent that
write) + :func:`lease_length`, which is shorter than the reaper's bound by
:func:`fence_margin`. The database records the heartbeat after the node sent
it, so the node's deadline always comes first; only durations are compared,
on each host's monotonic clock, never one host's wall clock with another's.

The heartbeat thread of the node's main process renews the lease; the builds
run in pool processes, forked from it, which read the same shared memory.
Each pool process watches the lease from a thread of its own that does no I/O
(:func:`guard`), so a build whose log writes hang on a cut database
connection is stopped all the same; a main process that hangs (no more
heartbeats) lets the lease expire too. ``cicd run`` has no lease: nothing
there ever expires.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cicd.config import Settings

__all__ = [
    "LEASE_TICK", "heartbeat_interval", "fence_margin", "lease_length", "hold", "renew",
    "expired", "wait_renewed", "guard",
]  # fmt: skip

log = logging.getLogger(__name__)

#: How often a pool process's watcher looks at the lease, in seconds.
LEASE_TICK = 0.2

# Shared with the pool processes: created at import, in the main process, before the fork.
_held = multiprocessing.RawValue(ctypes.c_bool, False)
_until = multiprocessing.RawValue(ctypes.c_double, 0.0)


def heartbeat_interval(settings: Settings) -> float:
    """Seconds between two heartbeats: 2, or less so that a lease spans about four of them."""
    return min(2.0, settings.agent_offline_after / 5)


def touch_interval(settings: Settings) -> float:
    """Seconds a node may go without writing its row while nothing in it changed: two
    heartbeats, or half a lease, so that the lease is still renewed twice over."""
    return min(2 * heartbeat_interval(settings), lease_length(settings) / 2)


def fence_margin(settings: Settings) -> float:
    """How much sooner than the reaper the node stops its builds: 1 s, or a fifth of the bound.

    It covers stopping the script (a SIGKILL, or a container kill, seen within
    :data:`LEASE_TICK`) and the rates of the two hosts' clocks differing.
    """
    return max(1.0, settings.agent_offline_after / 5)


def lease_length(settings: Settings) -> float:
    """How long a heartbeat that reached the database lets this node's builds run."""
    return settings.agent_offline_after - fence_margin(settings)


def hold() -> None:
    """This process is a worker node: its builds need the lease (expired until first renewed)."""
    _until.value = 0.0
    _held.value = True


def renew(sent_at: float, length: float) -> None:
    """A heartbeat sent at ``sent_at`` (monotonic) reached the database."""
    _until.value = max(_until.value, sent_at + length)


def expired() -> bool:
    """Whether this node's builds must stop: its last heartbeat that got through is too old."""
    return _held.value and time.monotonic() >= _until.value


def wait_renewed(timeout: float) -> bool:
    """Wait up to ``timeout`` s for a live lease (right after an outage, the heartbeat thread
    may not have written yet); whether there is one."""
    deadline = time.monotonic() + timeout
    while expired():
        if time.monotonic() >= deadline:
            return False
        time.sleep(LEASE_TICK)
    return True


class _Watcher(threading.Thread):
    """A pool process's thread calling the stop callbacks of its guarded steps on expiry."""

    def __init__(self) -> None:
        super().__init__(name="opscd-lease-watcher", daemon=True)
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.guarded: dict[int, Callable[[], None]] = {}

    def run(self) -> None:
        while True:
            time.sleep(LEASE_TICK)
            if not expired():
                continue
            with self.lock:
                stops, self.guarded = list(self.guarded.values()), {}
            for stop in stops:
                try:
                    stop()
                except Exception:
                    log.exception("could not stop a build whose lease expired")


_watcher: _Watcher | None = None
_watcher_lock = threading.Lock()


def _current_watcher() -> _Watcher:
    global _watcher
    with _watcher_lock:
        if _watcher is None or _watcher.pid != os.getpid() or not _watcher.is_alive():
            _watcher = _Watcher()  # threads do not survive a fork: one per process
            _watcher.start()
        return _watcher


@contextmanager
def guard(stop: Callable[[], None]) -> Iterator[None]:
    """While the body runs, ``stop`` is called once, from another thread, if the lease expires.

    Executors wrap the running script in this; ``stop`` kills it at once (no
    grace period: the margin before the reaper is short).
    """
    if not _held.value:
        yield
        return
    watcher = _current_watcher()
    key = id(stop)
    with watcher.lock:
        watcher.guarded[key] = stop
    try:
        yield
    finally:
        with watcher.lock:
            watcher.guarded.pop(key, None)
