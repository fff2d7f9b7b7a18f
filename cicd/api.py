"""REST API: read builds and their logs. JSON everywhere except the plain-text log."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from sqlalchemy import select

from cicd import db
from cicd.models import STAGES, TaskDetail, TaskLog, TaskStage, TaskState, TaskStatus

__all__ = ["bp", "task_to_dict", "external_url"]

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_LIMIT = 500


def external_url(endpoint: str, **values: Any) -> str:
    """An absolute link: under ``CICD_PUBLIC_URL`` when set, else the request's own host."""
    base = current_app.config.get("PUBLIC_URL")
    if base:
        return base.rstrip("/") + url_for(endpoint, **values)
    return url_for(endpoint, **values, _external=True)


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def task_to_dict(task: TaskDetail, stages: list[TaskStage] | None = None) -> dict[str, Any]:
    """One build as the API shows it; plain data, no ORM objects."""
    status = task.status
    duration = None
    if status.started_at is not None and status.finished_at is not None:
        duration = round((status.finished_at - status.started_at).total_seconds(), 3)
    data = {
        "task_id": task.id,
        "url": external_url("api.get_task", task_id=task.id),
        "log_url": external_url("api.get_log", task_id=task.id),
        "forge": task.forge,
        "project": task.project,
        "clone_url": task.clone_url,
        "web_url": task.web_url,
        "ref": task.ref,
        "ref_type": task.ref_type.value,
        "ref_name": task.ref_name,
        "branch": task.ref_name if task.ref_type == "branch" else None,
        "tag": task.ref_name if task.ref_type == "tag" else None,
        "commit_sha": task.commit_sha,
        "before_sha": task.before_sha,
        "commit_message": task.commit_message,
        "commit_author": task.commit_author,
        "pusher": task.pusher,
        "state": status.state.value,
        "stage": status.stage.value if status.stage else None,
        "worker": status.worker,
        "exit_code": status.exit_code,
        "error": status.error,
        "image": status.image,
        "image_digest": status.image_digest,
        "created_at": _iso(task.created_at),
        "queued_at": _iso(status.queued_at),
        "enqueued_at": _iso(status.enqueued_at),
        "started_at": _iso(status.started_at),
        "finished_at": _iso(status.finished_at),
        "duration_seconds": duration,
    }
    if stages is not None:
        by_stage = {row.stage: row for row in stages}
        data["stages"] = [
            {
                "stage": stage.value,
                "state": by_stage[stage].state.value if stage in by_stage else None,
                "worker": by_stage[stage].worker if stage in by_stage else None,
                "started_at": _iso(by_stage[stage].started_at) if stage in by_stage else None,
                "finished_at": _iso(by_stage[stage].finished_at) if stage in by_stage else None,
            }
            for stage in STAGES
        ]
    return data


def _error(status: int, message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    return response


@bp.get("/tasks")
def list_tasks() -> Response:
    """Builds, newest first; filter with ``project``, ``branch``, ``tag``, ``state``."""
    query = select(TaskDetail).join(TaskDetail.status).order_by(TaskDetail.id.desc())
    args = request.args
    if project := args.get("project"):
        query = query.where(TaskDetail.project == project)
    for ref_type in ("branch", "tag"):
        if name := args.get(ref_type):
            query = query.where(TaskDetail.ref_type == ref_type, TaskDetail.ref_name == name)
    if state := args.get("state"):
        try:
            query = query.where(TaskStatus.state == TaskState(state))
        except ValueError:
            allowed = ", ".join(s.value for s in TaskState)
            return _error(400, f"state must be one of: {allowed}")
    try:
        limit = min(int(args.get("limit", 50)), MAX_LIMIT)
        before = int(args["before"]) if "before" in args else None
    except ValueError:
        return _error(400, "limit and before must be integers")
    if before is not None:
        query = query.where(TaskDetail.id < before)
    with db.session() as session:
        tasks = session.scalars(query.limit(max(limit, 1))).unique().all()
        return jsonify(tasks=[task_to_dict(t) for t in tasks])


@bp.get("/tasks/<int:task_id>")
def get_task(task_id: int) -> Response:
    with db.session() as session:
        task = session.get(TaskDetail, task_id)
        if task is None:
            return _error(404, f"no task {task_id}")
        stages = session.scalars(select(TaskStage).where(TaskStage.task_id == task_id)).all()
        return jsonify(task_to_dict(task, list(stages)))


@bp.get("/tasks/<int:task_id>/log")
def get_log(task_id: int) -> Response:
    """The build's whole log so far, as plain text."""
    with db.session() as session:
        if session.get(TaskDetail, task_id) is None:
            return _error(404, f"no task {task_id}")
        chunks = session.scalars(
            select(TaskLog.content).where(TaskLog.task_id == task_id).order_by(TaskLog.id)
        )
        return Response("".join(chunks), mimetype="text/plain")
