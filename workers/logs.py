"""Build log writer: masks secrets and appends the output to ``task_logs`` while the build runs.

Logs go to the database, not a local file, so a build run on host A is readable
on host B through the API. Output is written in chunks: a line is stored at most
:data:`FLUSH_SECONDS` after it was written, together with every line written in
between, so a busy build costs a few inserts a second and OpsCD's own lines of a
stage (cloning, checked out, step started) share one insert where they can.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from sqlalchemy import func, literal, select
from sqlalchemy import insert as insert_into

from cicd import db
from cicd.models import Stage, TaskLog, TaskStatus, utcnow

__all__ = [
    "Masker", "LogWriter", "LogBudget", "LogStore", "task_log_store", "stored_log_bytes",
    "record_superseded",
]  # fmt: skip

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.1
#: Hold an unfinished line at most this long (or this big) waiting for its end,
#: so a secret split across two reads is still seen whole by the masker.
PARTIAL_LINE_SECONDS = 1.0
MAX_PENDING_CHARS = 64 * 1024
MASK = "[MASKED]"


class Masker:
    """Replaces each known secret value with ``[MASKED]``, longest first."""

    def __init__(self, secrets: Iterable[str]) -> None:
        whole = {s for s in secrets if s and len(s) >= 3}
        # Each line of a secret of several lines (a key) too: logs are stored line by line,
        # so such a secret can reach the masker in pieces.
        lines = {line.strip("\r") for s in whole if "\n" in s for line in s.split("\n")}
        self.secrets = sorted(whole | {s for s in lines if len(s) >= 3}, key=len, reverse=True)

    def with_secrets(self, secrets: Iterable[str]) -> Masker:
        """A masker that also hides ``secrets`` (e.g. one build's secret variables)."""
        return Masker([*self.secrets, *secrets])

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


#: Where masked log text goes: the database for real builds, the terminal for ``cicd run``.
LogStore = Callable[[str], None]


class LogBudget:
    """Bytes a run may still store (``CICD_MAX_LOG_BYTES``), shared by the writers of steps
    that run at once; None: no limit."""

    def __init__(self, room: int | None) -> None:
        self.room = room
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        """Up to ``wanted`` bytes of the room, taken now."""
        with self._lock:
            if self.room is None:
                return wanted
            granted = min(wanted, self.room)
            self.room -= granted
            return granted


class _Flusher:
    """One thread per process that stores each writer's pending lines when they are due, so
    a line is stored :data:`FLUSH_SECONDS` after it was written even when nothing else is
    (no executor ticking, a stage between two commands). Started in the process that
    writes: a pool process forked from the worker gets its own."""

    def __init__(self) -> None:
        self._due: dict[LogWriter, float] = {}
        self._ready = threading.Condition()
        self._pid: int | None = None

    def schedule(self, writer: LogWriter, at: float) -> None:
        with self._ready:
            if self._pid != os.getpid():
                self._pid, self._due = os.getpid(), {}
                threading.Thread(target=self._run, name="opscd-log-flusher", daemon=True).start()
            if at < self._due.get(writer, float("inf")):
                self._due[writer] = at
                self._ready.notify()

    def cancel(self, writer: LogWriter) -> None:
        with self._ready:
            self._due.pop(writer, None)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._due:
                    self._ready.wait()
                writer, at = min(self._due.items(), key=lambda item: item[1])
                wait = at - time.monotonic()
                if wait > 0:
                    self._ready.wait(wait)
                    continue
                del self._due[writer]
            try:
                writer.tick()
            except Exception:  # a store that failed says so itself; the thread goes on
                log.exception("log flusher: a writer failed")


_FLUSHER = _Flusher()


class LogWriter:
    """Collects one stage's (or one step's) output and hands it, masked, to a store in
    line-sized chunks.

    ``follows``: the writer whose lines come before this one's (a step's section follows
    its stage's): what it holds is stored first, so the log keeps the order of writing.
    """

    def __init__(
        self, store: LogStore, masker: Masker, max_bytes: int | LogBudget | None = None,
        follows: LogWriter | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.follows = follows
        self.mask = masker
        #: Bytes this writer may still store; past them output is dropped, once marked.
        self.budget = max_bytes if isinstance(max_bytes, LogBudget) else LogBudget(max_bytes)
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._partial_since: float | None = None
        self._pending_since = time.monotonic()
        # An executor may read output on one thread while another ticks the clock.
        self._lock = threading.RLock()

    def write(self, data: bytes | str) -> None:
        """Add output; a complete line reaches the database within :data:`FLUSH_SECONDS`."""
        with self._lock:
            text = self._decoder.decode(data) if isinstance(data, bytes) else data
            if text:
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending += text
            self.tick()

    def line(self, text: str, always: bool = False) -> None:
        """Add one line of OpsCD's own (not the build's), stored with what follows it within
        :data:`FLUSH_SECONDS`.

        ``always`` stores it now, even past the size limit: the line saying how a
        build ended must never be the one that is cut.
        """
        if always:
            self.flush()
            self.store(self.mask(text.rstrip("\n") + "\n"))
            return
        self.write(text.rstrip("\n") + "\n")

    def tick(self) -> None:
        """Flush if due; executors call this while they wait for output, and the process's
        flusher when a line's time is up."""
        with self._lock:
            self._tick()
            if self._pending:  # what is held waits for its own time, or the line's end
                due = self._pending_since + FLUSH_SECONDS
                if self._partial_since is not None and "\n" not in self._pending:
                    due = self._partial_since + PARTIAL_LINE_SECONDS
                _FLUSHER.schedule(self, max(due, time.monotonic() + 0.01))

    def _tick(self) -> None:
        now = time.monotonic()
        if self._pending and not self._pending.endswith("\n"):
            self._partial_since = self._partial_since or now
        else:
            self._partial_since = None
        due = self._pending and now - self._pending_since >= FLUSH_SECONDS
        if due or len(self._pending) > MAX_PENDING_CHARS:
            force = (
                self._partial_since is not None
                and now - self._partial_since >= PARTIAL_LINE_SECONDS
            ) or len(self._pending) > MAX_PENDING_CHARS
            self._flush(partial=force, hold=True)

    def flush(self, partial: bool = True) -> None:
        """Store what is pending: everything, or only complete lines."""
        with self._lock:
            self._flush(partial)

    def _flush(self, partial: bool, hold: bool = False) -> None:
        """``hold``: an unfinished line forced out keeps back its last characters (fewer than
        the longest secret), already masked, so a secret cut there is masked once whole."""
        if self.follows is not None:
            self.follows.flush(partial=False)
        if partial:
            text, self._pending = self.mask(self._pending), ""
            self._partial_since = None
            keep = max((len(s) for s in self.mask.secrets), default=1) - 1
            if hold and keep > 0:
                text, self._pending = text[:-keep], text[-keep:]
        else:
            cut = self._pending.rfind("\n") + 1
            text, self._pending = self._pending[:cut], self._pending[cut:]
        self._pending_since = time.monotonic()  # what stays is held from now on
        if text and not self.truncated:
            self._store(self.mask(text))

    def _store(self, text: str) -> None:
        data = text.encode()
        granted = self.budget.take(len(data))
        if granted == len(data):
            self.store(text)
            return
        kept = data[:granted].decode("utf-8", "ignore")
        self.truncated = True
        self.store(
            kept + "\n[opscd] log truncated here: this build's output passed CICD_MAX_LOG_BYTES; "
            "the rest is not stored, and the build goes on with its real result.\n"
        )

    def close(self) -> None:
        with self._lock:
            self._pending += self._decoder.decode(b"", final=True)
            self._flush(partial=True)
        _FLUSHER.cancel(self)

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def stored_log_bytes(task_id: int, attempt: int) -> int:
    """How many log bytes the run has stored so far (the limit is per run, all stages)."""
    with db.session() as session:
        total = session.scalar(
            select(func.coalesce(func.sum(func.length(TaskLog.content)), 0)).where(
                TaskLog.task_id == task_id, TaskLog.attempt == attempt
            )
        )
    return int(total or 0)


def task_log_store(task_id: int, stage: Stage, attempt: int, step: str | None = None) -> LogStore:
    """Appends to the task's rows in ``task_logs``, waiting out a short database outage.

    ``step``: the rows are that step's section of the build stage's log.

    Fenced by the run: a row is stored only while ``attempt`` is the task's
    current one (one ``INSERT … SELECT`` from its ``task_states`` row, which
    the reaper's requeue locks), so a run that was given up for dead and goes
    on somewhere adds nothing to the log of the run that replaced it.
    """
    columns = ["task_id", "stage", "step", "attempt", "created_at", "content"]

    def insert(text: str) -> bool:
        row = select(
            literal(task_id), literal(stage, TaskLog.stage.type),
            literal(step, TaskLog.step.type), literal(attempt),
            literal(utcnow(), TaskLog.created_at.type), literal(text, TaskLog.content.type),
        ).where(TaskStatus.task_id == task_id, TaskStatus.attempt == attempt)  # fmt: skip
        with db.session() as session:
            statement = insert_into(TaskLog).from_select(columns, row)
            # An INSERT's rowcount is kept only when asked for (psycopg's is lost otherwise).
            options = {"preserve_rowcount": True}
            stored = session.execute(statement, execution_options=options).rowcount
            session.commit()
        return stored == 1

    def store(text: str) -> None:
        try:
            if not db.retrying(lambda: insert(text), f"task {task_id}: storing log"):
                log.info("task %s: run %s is no longer current; its output is dropped",
                         task_id, attempt)  # fmt: skip
        except Exception:  # the build goes on; its result still reaches task_states
            log.exception("task %s: could not store %d characters of log", task_id, len(text))

    return store


def record_superseded(task_id: int, attempt: int, current: int) -> None:
    """The last line of a run that learnt another replaced it, in its own run's log."""
    line = f"\n[opscd] run {attempt} was superseded by run {current}; its script was stopped\n"
    with db.session() as session:
        session.add(TaskLog(task_id=task_id, stage=None, attempt=attempt, content=line))
        session.commit()
