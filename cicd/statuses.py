"""Commit statuses back to the forge: recorded with each transition, delivered later.

A project registered with a forge API token (``cicd projects add … --api-token-stdin``)
shows its builds where its users work: a status per unit (``opscd/build``,
``opscd/publish``) on the pushed commit, so a merge that waits for the
pipeline waits for OpsCD. The webhook records ``pending`` with the task
(before the answer, so no merge slips through before the build begins);
:mod:`cicd.lifecycle` records each later state in the transaction of the
transition that causes it. That makes ``commit_statuses`` an outbox: a status
exists exactly when its transition committed, whatever dies afterwards.

The reporter process (``cicd.reporter``, the Procfile's ``reporter``) delivers
the rows in ``id`` order per task with the forge's module (one request at a
time per commit, as GitLab answers 409 to concurrent updates of one commit).
A state equal to the last one posted for the same status is skipped (GitLab
refuses a repeat with 400 "Cannot transition status …", and such an answer
counts as delivered too); 409, 429, 5xx and network errors are tried again,
backing off to at most :data:`MAX_BACKOFF` seconds, for :data:`GIVE_UP_AFTER`.
Nothing here changes a build's result: a status that cannot be delivered is
recorded as such and shown on the build's page.

After a commit that recorded statuses, the session wakes the reporter through
the broker (:func:`cicd.broker.wake_reporter`); the reporter also looks every
few seconds, so a lost wake-up only delays a status.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, event, insert, or_, select, update
from sqlalchemy.orm import Session

from cicd import db, projects
from cicd.config import Settings
from cicd.errors import OpsCDError
from cicd.forges import FORGES, StatusError, StatusRefused
from cicd.forges import module as forge_module
from cicd.models import CommitStatus, Project, TaskDetail, iso
from cicd.secrets import decrypt

__all__ = [
    "BUILD",
    "PUBLISH",
    "OPEN_STATES",
    "MAX_BACKOFF",
    "GIVE_UP_AFTER",
    "first",
    "record_first",
    "report",
    "close_open",
    "publishing",
    "api_url_of",
    "reports",
    "matrix_unit",
    "deliver_due",
    "delivery_of",
]

log = logging.getLogger(__name__)

#: The status names a build shows on the forge, one per unit of work.
BUILD, PUBLISH = "opscd/build", "opscd/publish"
#: States the forge still expects a later one after.
OPEN_STATES = ("pending", "running")
#: Longest wait between two tries of one status, and how long it is tried at all.
MAX_BACKOFF = 30.0
GIVE_UP_AFTER = dt.timedelta(days=1)
#: How long a reporter holds a status it is posting before another may try it.
LEASE = dt.timedelta(seconds=60)
#: The forge's answer is awaited this long, then the status is tried again.
POST_TIMEOUT = 10.0

_WAKE = "opscd.statuses.wake"


# --- recording, in the transaction of each transition -----------------------------------------


def reports(registration: Project | None) -> bool:
    """Whether builds of this registration post commit statuses (it has an API token)."""
    return registration is not None and registration.api_token_ciphertext is not None


def matrix_unit(label: str) -> str:
    """The status name of one matrix combination: ``opscd/build [GO=1.19]`` (a digest of the
    label when that is too long for a status name)."""
    unit = f"{BUILD} [{label}]"
    if len(unit) <= 64:
        return unit
    return f"{BUILD} [{hashlib.sha256(label.encode()).hexdigest()[:12]}]"


#: The status a new task of a reporting project starts with, on its commit.
_FIRST = {"unit": BUILD, "state": "pending", "description": "queued"}
_INSERT_STATUS = insert(CommitStatus.__table__)


def first(detail: TaskDetail) -> TaskDetail:
    """A new task of a reporting project starts ``pending`` on the forge (added with it)."""
    detail.commit_statuses = [CommitStatus(**_FIRST)]
    return detail


def record_first(connection: Connection, task_id: int) -> None:
    """:func:`first` for a task inserted with SQLAlchemy Core (the webhook's), in the caller's
    transaction: the status exists exactly when the task does."""
    connection.execute(_INSERT_STATUS, {"task_id": task_id, **_FIRST})


def _latest(session: Session, task_ids: Iterable[int]) -> dict[tuple[int, str], str]:
    """The last recorded state of each status of the tasks (none: the task does not report)."""
    rows = session.execute(
        select(CommitStatus.task_id, CommitStatus.unit, CommitStatus.state)
        .where(CommitStatus.task_id.in_(list(task_ids)))
        .order_by(CommitStatus.id)
    )
    return {(task_id, unit): state for task_id, unit, state in rows}


def _add(session: Session, task_id: int, unit: str, state: str, description: str) -> None:
    session.add(CommitStatus(task_id=task_id, unit=unit, state=state,
                             description=description[:255]))  # fmt: skip
    session.info[_WAKE] = True


def report(
    session: Session, task_id: int, unit: str, state: str, description: str,
    latest: dict[tuple[int, str], str] | None = None,
) -> None:  # fmt: skip
    """Record ``unit``'s new state, if the task reports and the state is a new one
    (``latest``: the task's last states, if read already)."""
    latest = _latest(session, [task_id]) if latest is None else latest
    if latest and latest.get((task_id, unit)) != state:
        _add(session, task_id, unit, state, description)


def close_open(session: Session, task_ids: Iterable[int], state: str, description: str) -> None:
    """Every status of the tasks still pending or running ends in ``state`` (a failure, a
    cancel, the build's success)."""
    for (task_id, unit), last in _latest(session, task_ids).items():
        if last in OPEN_STATES:
            _add(session, task_id, unit, state, description)


def publishing(session: Session, task_id: int) -> None:
    """The publish stage builds an image: ``opscd/publish`` running, then ``opscd/build``
    success (in that order: the commit never looks done in between)."""
    latest = _latest(session, [task_id])
    report(session, task_id, PUBLISH, "running", "publishing the image", latest)
    report(session, task_id, BUILD, "success", "built", latest)


@event.listens_for(Session, "after_commit")
def _wake_after_commit(session: Session) -> None:
    if session.info.pop(_WAKE, False):
        from cicd.broker import wake_reporter  # the broker module imports the lifecycle's

        wake_reporter()


@event.listens_for(Session, "after_rollback")
def _nothing_to_wake(session: Session) -> None:
    session.info.pop(_WAKE, None)


# --- delivery, by the reporter ----------------------------------------------------------------


def api_url_of(registration: Project) -> str:
    """The forge's base URL: the registered one, else the clone URL's origin."""
    if registration.api_url:
        return registration.api_url.rstrip("/")
    parts = urlsplit(registration.clone_url)
    return f"{parts.scheme}://{parts.netloc}"


def backoff(tries: int) -> float:
    """Seconds before try ``tries + 1``: 1, 2, 4, … up to :data:`MAX_BACKOFF`."""
    return min(MAX_BACKOFF, 2.0 ** max(0, tries - 1))


def deliver_due(settings: Settings) -> float | None:
    """Post every status that is due, oldest first per task; return the seconds until the next
    one is due (None: nothing is waiting)."""
    while True:
        with db.session() as session:
            now = db.clock(session)  # one clock for every reporter host: the database's
            rows = session.execute(
                select(CommitStatus.id, CommitStatus.task_id, CommitStatus.next_try_at)
                .where(CommitStatus.delivered_at.is_(None))
                .order_by(CommitStatus.id)
                .limit(500)
            ).all()
        heads: dict[int, Any] = {}
        for row in rows:  # a task's later statuses wait for its earlier ones
            heads.setdefault(row.task_id, row)
        delivered, wait = 0, None
        for head in heads.values():
            if head.next_try_at is not None and head.next_try_at > now:
                due_in = (head.next_try_at - now).total_seconds()
                wait = due_in if wait is None else min(wait, due_in)
                continue
            if _deliver(settings, head.id):
                delivered += 1
            else:
                wait = 0.0 if wait is None else min(wait, 0.0)
        if not delivered:
            return wait


def _deliver(settings: Settings, status_id: int) -> bool:
    """Claim one status, post it, record what came of it; False if it is to be tried again
    (or another reporter holds it). No database connection is held while the forge is
    waited for."""
    with db.session() as session:
        now = db.clock(session)
        claimed = session.execute(
            update(CommitStatus)
            .where(
                CommitStatus.id == status_id,
                CommitStatus.delivered_at.is_(None),
                or_(CommitStatus.next_try_at.is_(None), CommitStatus.next_try_at <= now),
            )
            .values(next_try_at=now + LEASE, tries=CommitStatus.tries + 1)
        ).rowcount
        session.commit()
        if not claimed:
            return False
        status = session.get(CommitStatus, status_id)
        task = session.get(TaskDetail, status.task_id)
        posted = session.scalar(
            select(CommitStatus.state)
            .where(CommitStatus.task_id == status.task_id, CommitStatus.unit == status.unit,
                   CommitStatus.outcome == "posted")
            .order_by(CommitStatus.id.desc())
            .limit(1)
        )  # fmt: skip
        registration = projects.governing(session, task.project) if task else None
        session.expunge_all()  # plain objects from here: the connection goes back to the pool
    what = f"status {status.unit} {status.state} of task {status.task_id}"
    outcome, error, retry = _post(settings, status, task, registration, posted)
    # An error is kept after a later try succeeds: the page shows what delayed it.
    values: dict[str, Any] = {"last_error": error} if error else {}
    if retry and now - status.created_at < GIVE_UP_AFTER:
        values["next_try_at"] = now + dt.timedelta(seconds=backoff(status.tries))
    else:
        values.update(outcome=outcome or "error", delivered_at=now, next_try_at=None)
    with db.session() as session:
        session.execute(update(CommitStatus).where(CommitStatus.id == status_id).values(**values))
        session.commit()
    if error:
        log.warning("%s: %s (%s)", what, error, "tried again" if retry else outcome or "given up")
    return not retry


def _post(
    settings: Settings, status: CommitStatus, task: TaskDetail | None,
    registration: Project | None, posted: str | None,
) -> tuple[str | None, str | None, bool]:  # fmt: skip
    """(outcome, error, retry) of posting ``status``."""
    if task is None or not reports(registration):
        return "error", "the project no longer has an API token: not posted", False
    if posted == status.state:
        return "skipped", None, False
    if registration.forge not in FORGES:
        return "error", f"forge {registration.forge!r} has no commit status API here", False
    try:
        token = decrypt(registration.api_token_ciphertext, settings.secrets_key)
        # GitLab's id survives a rename; GitHub and Gitea name repositories by path only.
        own_id = registration.forge_project_id and not registration.path.endswith("/*")
        by_id = own_id and registration.forge == "gitlab"
        project = registration.forge_project_id if by_id else task.project
        forge_module(registration.forge).post_status(
            api_url_of(registration), token, project,
            task.commit_sha, state=status.state, ref=task.ref_name, name=status.unit,
            description=status.description, target_url=_target_url(settings, task.id),
            timeout=POST_TIMEOUT,
        )  # fmt: skip
    except StatusRefused as error:
        return "refused", str(error), False
    except StatusError as error:
        return None, str(error), error.retry
    except OpsCDError as error:  # e.g. the token cannot be decrypted with this key
        return "error", str(error), False
    return "posted", None, False


def _target_url(settings: Settings, task_id: int) -> str | None:
    return f"{settings.public_url.rstrip('/')}/tasks/{task_id}" if settings.public_url else None


# --- what the API and the build page show --------------------------------------------------


def delivery_of(session: Session, task_id: int) -> list[dict[str, Any]]:
    """Each status recorded for the task, oldest first, with how its delivery went."""
    rows = session.scalars(
        select(CommitStatus).where(CommitStatus.task_id == task_id).order_by(CommitStatus.id)
    )
    return [
        {
            "name": row.unit,
            "state": row.state,
            "description": row.description,
            "delivery": row.outcome or ("retrying" if row.last_error else "queued"),
            "tries": row.tries,
            "last_error": row.last_error,
            "recorded_at": iso(row.created_at),
            "delivered_at": iso(row.delivered_at),
        }
        for row in rows
    ]
