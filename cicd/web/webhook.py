"""``POST /webhooks/<forge>``: parse → find the registration → verify → record → commit →
enqueue, and answer fast.

A webhook only says that a *registered* project changed: the project's
registration (:mod:`cicd.projects`) decides whether it is built at all, which
secret its deliveries carry and where it is cloned from; the payload's clone
URL must be that one, and a refused delivery records nothing.

GitLab waits a few seconds and redelivers what it thinks failed, keeping the
``X-Gitlab-Event-UUID``; a delivery id seen before returns the first task.
The rows are committed before the chain is sent: if the broker is down the
task is marked failed and the answer is 503, and GitLab's redelivery (same
id) sends that same task again instead of recording a second one.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from cicd import db, lifecycle, projects, statuses
from cicd.broker import BrokerUnavailable, revoke_build, send_task
from cicd.errors import PayloadError
from cicd.forges import Ignored, PushEvent, gitlab, skips_ci
from cicd.models import Project, RefType, TaskDetail, TaskStatus
from cicd.web.api import external_url

__all__ = ["bp"]

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)


def _answer(status: int, **body: object) -> tuple[Response, int]:
    return jsonify(body), status


@bp.post("/webhooks/gitlab")
def gitlab_webhook() -> tuple[Response, int]:
    """Receive one GitLab delivery."""
    token = gitlab.token(request.headers)
    try:
        event = gitlab.parse(request.headers, request.get_data())
    except PayloadError as error:
        return _answer(400, error=str(error))
    try:
        if isinstance(event, Ignored):  # only a registered project's sender learns even that
            with db.session() as session:
                if not projects.any_secret_matches(session, token):
                    return _answer(401, error="invalid or missing X-Gitlab-Token")
            return _answer(200, ignored=event.reason)
        with db.session() as session:
            registration = projects.governing(session, event.project)
            refused = _refusal(registration, event, token)
            if refused is not None:
                return refused
            if skips_ci(event.commit_message):  # after the secret: only the project learns it
                return _answer(200, ignored="skip ci")
            if event.forge_project_id is not None and registration.forge_project_id is None:
                if not registration.path.endswith("/*"):
                    projects.record_forge_id(session, registration, event.forge_project_id)
                    session.commit()
            clone_url = projects.clone_url_of(registration, event.project)
            reports = statuses.reports(registration)
        return _record_and_enqueue(event, clone_url, reports)
    except OperationalError as error:
        log.error("webhook: database unavailable: %s", error.orig)
        return _answer(503, error="database unavailable; retry later")


def _refusal(
    registration: Project | None, event: PushEvent, token: str | None
) -> tuple[Response, int] | None:
    """Why this delivery is not built (404, 401 or 400), or None when it is."""
    if registration is None:
        hint = f"cicd projects add {event.project} --clone-url {event.clone_url}"
        return _answer(404, error=f"project {event.project} is not registered; add it with: {hint}")
    if not projects.secret_matches(registration, token):
        return _answer(401, error=f"invalid or missing X-Gitlab-Token for project {event.project}")
    expected = projects.clone_url_of(registration, event.project)
    if not projects.same_url(event.clone_url, expected):
        return _answer(400, error=f"project {event.project} is registered with clone URL "
                       f"{expected}, but the payload names {event.clone_url}")  # fmt: skip
    recorded = registration.forge_project_id
    if recorded is not None and event.forge_project_id not in (None, recorded):
        return _answer(400, error=f"project {event.project} is GitLab project {recorded} here, "
                       f"but the payload is project {event.forge_project_id}; if it was "
                       "recreated, register it again")  # fmt: skip
    return None


def _record_and_enqueue(event: PushEvent, clone_url: str, reports: bool) -> tuple[Response, int]:
    """``reports``: the project's builds post commit statuses."""
    fields = {**event.to_dict(), "clone_url": clone_url, "ref_type": RefType(event.ref_type)}
    del fields["forge_project_id"]
    with db.session() as session:

        def record() -> int:
            task = lifecycle.accept(TaskDetail(**fields), reports)
            session.add(task)
            try:
                session.commit()
            except BaseException:
                session.rollback()
                raise
            return task.id

        try:
            task_id = db.retry_conflicts(record, "webhook: recording the build")
        except IntegrityError as error:
            return _redelivery(session, event, error)
        answer = _enqueue(task_id, status=202, session=session)
    if current_app.config["AUTO_CANCEL"] and event.ref_type == "branch":
        _cancel_superseded(event, task_id)
    return answer


def _cancel_superseded(event: PushEvent, newest: int) -> None:
    """``CICD_AUTO_CANCEL``: older unfinished builds of the same branch are canceled.

    The new build is recorded and sent already: a failure here is logged, and
    the older builds just run to their end.
    """
    older = select(TaskDetail.id).where(
        TaskDetail.project == event.project,
        TaskDetail.ref_type == RefType.BRANCH,
        TaskDetail.ref_name == event.ref_name,
        TaskDetail.id < newest,
    )

    def cancel() -> list[int]:
        with db.session() as session:
            unfinished = session.scalars(
                select(TaskStatus.task_id)
                .where(TaskStatus.task_id.in_(older), TaskStatus.state.in_(lifecycle.UNFINISHED))
                .order_by(TaskStatus.task_id)
            ).all()
            lifecycle.supersede(session, list(unfinished), newest)
            session.commit()
        return list(unfinished)

    try:
        unfinished = db.retry_conflicts(cancel, f"webhook: superseding builds older than {newest}")
    except OperationalError as error:
        log.warning("webhook: older builds of %s not canceled: %s", event.ref_name, error.orig)
        return
    for task_id in unfinished:  # the stages of those that ended meanwhile are stale anyway
        revoke_build(task_id)


def _redelivery(session: Session, event: PushEvent, error: IntegrityError) -> tuple[Response, int]:
    """A delivery id seen before: the first task stands; send it again only if it never left."""
    task = session.scalar(
        select(TaskDetail).where(
            TaskDetail.forge == event.forge, TaskDetail.delivery_id == event.delivery_id
        )
    )
    if task is None:  # the unique key is not what failed
        raise error
    # Claim the resend: of two concurrent redeliveries (or one and the reconciler) one sends.
    claimed = lifecycle.claim_unsent(session, task.id)
    session.commit()
    if claimed:
        return _enqueue(task.id, status=202, session=session)
    return _answer(200, task_id=task.id, url=_task_url(task.id), duplicate=True)


def _enqueue(task_id: int, status: int, session: Session | None = None) -> tuple[Response, int]:
    try:
        send_task(task_id, session=session)
    except BrokerUnavailable as error:
        log.error("webhook: %s", error)
        return _answer(503, task_id=task_id, error="broker unavailable; redeliver later")
    return _answer(status, task_id=task_id, url=_task_url(task_id), state="queued")


def _task_url(task_id: int) -> str:
    return external_url("api.get_task", task_id=task_id)
