"""``POST /webhooks/<forge>``: parse → find the registration → verify → record → commit →
enqueue, and answer fast.

A webhook only says that a *registered* project changed: the project's
registration (:mod:`cicd.projects`) decides whether it is built at all, which
secret its deliveries carry and where it is cloned from; the payload's clone
URL must be that one, and a refused delivery records nothing. GitLab sends the
secret as is (``X-Gitlab-Token``); GitHub and Gitea sign the raw body with it
(HMAC SHA-256), so those deliveries are verified before the body is trusted.

A merge request is a delivery of its *target* project, which authenticates it.
Its commits are built as the source project's when that one is registered (its
clone URL, its secrets policy, its statuses), as the target's own when it is
the same project, and from a fork that is not registered only if the target
project allows it (``fork_mrs``: ``no-secrets``): then from the target
repository's ref of the request's head, without secrets, publishing nothing.

Forges redeliver what they think failed, keeping the delivery id; a delivery id
seen before returns the first task. The rows are committed before the chain is
sent: if the broker is down the task is marked failed and the answer is 503,
and the redelivery (same id) sends that same task again instead of recording a
second one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from cicd import db, lifecycle, projects, statuses
from cicd.broker import BrokerUnavailable, revoke_build, send_task
from cicd.errors import OpsCDError, PayloadError
from cicd.forges import SIGNING_FORGES, TITLES, Ignored, MergeRequestEvent, PushEvent, skips_ci
from cicd.forges import module as forge_module
from cicd.models import Project, RefType, TaskDetail, TaskStatus
from cicd.web.api import external_url

__all__ = ["bp"]

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)

#: The header that authenticates each forge's deliveries, for messages.
AUTH_HEADERS = {"gitlab": "X-Gitlab-Token", "github": "X-Hub-Signature-256",
                "gitea": "X-Gitea-Signature"}  # fmt: skip
Event = PushEvent | MergeRequestEvent


@dataclass(frozen=True)
class Build:
    """What one accepted delivery records: the task's columns, and whether it reports."""

    fields: dict[str, Any]
    reports: bool


def _answer(status: int, **body: object) -> tuple[Response, int]:
    return jsonify(body), status


@bp.post("/webhooks/gitlab")
def gitlab_webhook() -> tuple[Response, int]:
    """Receive one GitLab delivery (push, tag push, merge request; ``X-Gitlab-Token``)."""
    return _receive(forge_module("gitlab"))


@bp.post("/webhooks/github")
def github_webhook() -> tuple[Response, int]:
    """Receive one GitHub delivery (push, pull request, ping; ``X-Hub-Signature-256``)."""
    return _receive(forge_module("github"))


@bp.post("/webhooks/gitea")
def gitea_webhook() -> tuple[Response, int]:
    """Receive one Gitea or Forgejo delivery (push, pull request; ``X-Gitea-Signature``)."""
    return _receive(forge_module("gitea"))


def _receive(forge: ModuleType) -> tuple[Response, int]:
    body = request.get_data()
    try:
        event = forge.parse(request.headers, body)
    except PayloadError as error:
        return _answer(400, error=str(error))
    try:
        # One pooled connection for the whole delivery: the lookups, the rows, the send's
        # record and the auto-cancel (each checkout costs a ping and a reset).
        with db.held_session() as session:
            if isinstance(event, Ignored):  # only a registered project's sender learns even that
                if not _ignored_is_authentic(session, forge, body):
                    return _answer(401, error=f"invalid or missing {AUTH_HEADERS[forge.FORGE]}")
                return _answer(200, ignored=event.reason)
            registration = projects.governing(session, event.project)
            refused = _refusal(forge, registration, event, body)
            if refused is not None:
                return refused
            if skips_ci(event.commit_message):  # after the secret: only the project learns it
                return _answer(200, ignored="skip ci")
            if event.forge_project_id is not None and registration.forge_project_id is None:
                if not registration.path.endswith("/*"):
                    projects.record_forge_id(session, registration, event.forge_project_id)
                    session.commit()
            build = _build_of(session, registration, event)
            if not isinstance(build, Build):
                return build
            return _record_and_enqueue(session, event, build)
    except OperationalError as error:
        log.error("webhook: database unavailable: %s", error.orig)
        return _answer(503, error="database unavailable; retry later")
    except Unverifiable as error:
        log.error("webhook: %s", error)
        return _answer(503, error=str(error))


class Unverifiable(OpsCDError):
    """The server cannot check a signature now (the secret cannot be decrypted): the forge
    is told to deliver again later, nothing is recorded."""


def _authentic(forge: ModuleType, registration: Project, body: bytes) -> bool:
    """Whether the delivery carries (or is signed with) the registration's webhook secret."""
    if forge.FORGE in SIGNING_FORGES:
        key = current_app.config["SETTINGS"].secrets_key
        try:
            secret = projects.webhook_secret(registration, key)
        except OpsCDError as error:  # e.g. CICD_SECRETS_KEY is not the one it was kept with
            raise Unverifiable(f"cannot verify deliveries of {registration.path} now: "
                               f"{error}") from None  # fmt: skip
        return secret is not None and forge.signature_matches(request.headers, body, secret)
    return projects.secret_matches(registration, forge.token(request.headers))


def _ignored_is_authentic(session: Session, forge: ModuleType, body: bytes) -> bool:
    """An event that builds nothing is answered only to a registered project's sender: some
    registration's token (GitLab), the named repository's signature (GitHub, Gitea)."""
    if forge.FORGE not in SIGNING_FORGES:
        return projects.any_secret_matches(session, forge.token(request.headers))
    path = forge.repository(request.headers, body)
    registration = projects.governing(session, path) if path else None
    return (
        registration is not None
        and registration.forge == forge.FORGE
        and _authentic(forge, registration, body)
    )


def _refusal(
    forge: ModuleType, registration: Project | None, event: Event, body: bytes
) -> tuple[Response, int] | None:
    """Why this delivery is not built (404, 401 or 400), or None when it is."""
    if registration is None:
        hint = f"cicd projects add {event.project} --clone-url {event.clone_url}"
        if event.forge != "gitlab":
            hint += f" --forge {event.forge}"
        return _answer(404, error=f"project {event.project} is not registered; add it with: {hint}")
    if registration.forge != forge.FORGE:
        return _answer(400, error=f"project {event.project} is registered as a "
                       f"{TITLES.get(registration.forge, registration.forge)} project: its "
                       "deliveries go to "
                       f"/webhooks/{registration.forge}")  # fmt: skip
    if not _authentic(forge, registration, body):
        return _answer(401, error=f"invalid or missing {AUTH_HEADERS[forge.FORGE]} for project "
                       f"{event.project}")  # fmt: skip
    expected = projects.clone_url_of(registration, event.project)
    if not projects.same_url(event.clone_url, expected):
        return _answer(400, error=f"project {event.project} is registered with clone URL "
                       f"{expected}, but the payload names {event.clone_url}")  # fmt: skip
    recorded = registration.forge_project_id
    if recorded is not None and event.forge_project_id not in (None, recorded):
        return _answer(400, error=f"project {event.project} is {TITLES[forge.FORGE]} project "
                       f"{recorded} here, but the payload is project {event.forge_project_id}; "
                       "if it was recreated, register it again")  # fmt: skip
    return None


def _build_of(
    session: Session, registration: Project, event: Event
) -> Build | tuple[Response, int]:
    """The task a delivery records, or the answer when it records none."""
    if isinstance(event, PushEvent):
        fields = {**event.to_dict(), "ref_type": RefType(event.ref_type)}
        del fields["forge_project_id"]
        fields["clone_url"] = projects.clone_url_of(registration, event.project)
        return Build(fields, statuses.reports(registration))
    fields = {
        "forge": event.forge, "delivery_id": event.delivery_id, "project": event.project,
        "clone_url": projects.clone_url_of(registration, event.project), "web_url": event.web_url,
        "ref_type": RefType.BRANCH, "ref_name": event.source_branch,
        "commit_sha": event.commit_sha, "commit_message": event.commit_message,
        "commit_author": event.commit_author, "pusher": event.pusher,
        "merge_request_iid": event.number, "target_project": event.project,
    }  # fmt: skip
    if event.source_project == event.project:
        return Build(fields, statuses.reports(registration))
    source = projects.governing(session, event.source_project)
    if source is not None:  # a registered fork: its registration decides the clone URL and
        # the statuses; the build gets no secrets (its target_project is another project)
        expected = projects.clone_url_of(source, event.source_project)
        if source.forge != registration.forge or not projects.same_url(
            event.source_clone_url, expected
        ):
            return _answer(400, error=f"merge request !{event.number} comes from "
                           f"{event.source_project}, registered with clone URL {expected} "
                           f"on {source.forge}, but the payload names "
                           f"{event.source_clone_url}")  # fmt: skip
        fields.update(project=event.source_project, clone_url=expected, web_url=None)
        return Build(fields, statuses.reports(source))
    if registration.fork_mrs != "no-secrets":
        return _answer(200, ignored=f"merge request !{event.number} comes from the fork "
                       f"{event.source_project}, which is not registered, and {event.project} "
                       "does not build forks' merge requests (fork_mrs: off)")  # fmt: skip
    # Fetched from the target repository, which keeps every request's head under its own ref.
    fields.update(fork_of=event.source_project, head_ref=event.head_ref)
    return Build(fields, statuses.reports(registration))


def _record_and_enqueue(session: Session, event: Event, build: Build) -> tuple[Response, int]:
    """Commit the task's rows (SQLAlchemy Core, one transaction), then send its chain."""

    def record() -> int:
        try:
            task_id = lifecycle.accept_rows(session.connection(), build.fields, build.reports)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return task_id

    try:
        task_id = db.retry_conflicts(record, "webhook: recording the build")
    except IntegrityError as error:
        return _redelivery(session, event, error)
    answer = _enqueue(task_id, status=202, session=session)
    if current_app.config["AUTO_CANCEL"] and build.fields["ref_type"] is RefType.BRANCH:
        _cancel_superseded(session, build.fields, task_id)
    return answer


def _cancel_superseded(session: Session, fields: dict[str, Any], newest: int) -> None:
    """``CICD_AUTO_CANCEL``: older unfinished builds of the same branch (of a merge request:
    of the same request) are canceled.

    The new build is recorded and sent already: a failure here is logged, and
    the older builds just run to their end.
    """
    same = [TaskDetail.project == fields["project"], TaskDetail.id < newest]
    if fields.get("merge_request_iid") is not None:
        same += [
            TaskDetail.merge_request_iid == fields["merge_request_iid"],
            TaskDetail.target_project == fields["target_project"],
        ]
    else:
        same += [
            TaskDetail.ref_type == RefType.BRANCH,
            TaskDetail.ref_name == fields["ref_name"],
            TaskDetail.merge_request_iid.is_(None),
        ]
    older = select(TaskDetail.id).where(*same)

    def cancel() -> list[int]:
        try:
            unfinished = session.scalars(
                select(TaskStatus.task_id)
                .where(TaskStatus.task_id.in_(older), TaskStatus.state.in_(lifecycle.UNFINISHED))
                .order_by(TaskStatus.task_id)
            ).all()
            lifecycle.supersede(session, list(unfinished), newest)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return list(unfinished)

    try:
        unfinished = db.retry_conflicts(cancel, f"webhook: superseding builds older than {newest}")
    except OperationalError as error:
        log.warning("webhook: builds older than %s not canceled: %s", newest, error.orig)
        return
    for task_id in unfinished:  # the stages of those that ended meanwhile are stale anyway
        revoke_build(task_id)


def _redelivery(session: Session, event: Event, error: IntegrityError) -> tuple[Response, int]:
    """A delivery id seen before: the first task stands; send it again only if it never left."""
    task_id = session.scalar(
        select(TaskDetail.id).where(
            TaskDetail.forge == event.forge, TaskDetail.delivery_id == event.delivery_id
        )
    )
    if task_id is None:  # the unique key is not what failed
        raise error
    # Claim the resend: of two concurrent redeliveries (or one and the reconciler) one sends.
    claimed = lifecycle.claim_unsent(session, task_id)
    session.commit()
    if claimed:
        return _enqueue(task_id, status=202, session=session)
    return _answer(200, task_id=task_id, url=_task_url(task_id), duplicate=True)


def _enqueue(task_id: int, status: int, session: Session | None = None) -> tuple[Response, int]:
    try:
        send_task(task_id, session=session)
    except BrokerUnavailable as error:
        log.error("webhook: %s", error)
        return _answer(503, task_id=task_id, error="broker unavailable; redeliver later")
    return _answer(status, task_id=task_id, url=_task_url(task_id), state="queued")


def _task_url(task_id: int) -> str:
    return external_url("api.get_task", task_id=task_id)
