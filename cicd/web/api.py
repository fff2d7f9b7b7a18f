"""REST API: read builds and their logs. JSON everywhere except the plain-text log."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request, url_for
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, contains_eager

from cicd import agents, db, lifecycle, projects, secrets, statuses
from cicd.broker import BrokerUnavailable, revoke_build, send_publish, send_task
from cicd.errors import ConfigError
from cicd.models import (
    STAGES,
    Agent,
    AgentState,
    ApprovalDecision,
    Project,
    ProjectCache,
    TaskApproval,
    TaskDetail,
    TaskLog,
    TaskStage,
    TaskState,
    TaskStatus,
    TaskStep,
    iso,
    utcnow,
)

__all__ = [
    "bp", "task_to_dict", "agent_to_dict", "project_to_dict", "external_url", "fleet",
    "agent_registry", "task_details",
]  # fmt: skip

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_LIMIT = 500


def external_url(endpoint: str, **values: Any) -> str:
    """An absolute link: under ``CICD_PUBLIC_URL`` when set, else the request's own host."""
    base = current_app.config.get("PUBLIC_URL")
    if base:
        return base.rstrip("/") + url_for(endpoint, **values)
    return url_for(endpoint, **values, _external=True)


def task_to_dict(
    task: TaskDetail, stages: list[TaskStage] | None = None, approval: TaskApproval | None = None
) -> dict[str, Any]:
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
        "merge_request_iid": task.merge_request_iid,
        "merge_request_target": task.target_project,
        "fork_of": task.fork_of,
        "state": status.state.value,
        "stage": status.stage.value if status.stage else None,
        "worker": status.worker,
        "attempt": status.attempt,
        "exit_code": status.exit_code,
        "error": status.error,
        "image": status.image,
        "image_digest": status.image_digest,
        "retry_of": task.retry_of,
        "reuse_steps_of": task.reuse_steps_of,
        "created_at": iso(task.created_at),
        "queued_at": iso(status.queued_at),
        "enqueued_at": iso(status.enqueued_at),
        "started_at": iso(status.started_at),
        "finished_at": iso(status.finished_at),
        "duration_seconds": duration,
    }
    if stages is not None:
        data["approval"] = approval_to_dict(approval) if approval is not None else None
        by_stage = {row.stage: row for row in stages}
        data["stages"] = [
            {
                "stage": stage.value,
                "state": by_stage[stage].state.value if stage in by_stage else None,
                "worker": by_stage[stage].worker if stage in by_stage else None,
                "started_at": iso(by_stage[stage].started_at) if stage in by_stage else None,
                "finished_at": iso(by_stage[stage].finished_at) if stage in by_stage else None,
            }
            for stage in STAGES
        ]
    return data


def _error(status: int, message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    return response


def approval_to_dict(approval: TaskApproval) -> dict[str, Any]:
    return {
        "required": True,
        "requested_at": iso(approval.requested_at),
        "node": approval.node,
        "decision": approval.decision.value if approval.decision else None,
        "decided_by": approval.decided_by,
        "decided_at": iso(approval.decided_at),
    }


def agent_to_dict(agent: AgentState, offline_after: float, now: dt.datetime) -> dict[str, Any]:
    """One worker node; ``online`` is false once its heartbeats stop, whatever the row says."""
    age = (now - agent.last_heartbeat).total_seconds()
    return {
        "hostname": agent.hostname,
        "online": agent.online and age <= offline_after,
        "concurrency": agent.concurrency,
        "active": agent.active,
        "processed": agent.processed,
        "loadavg": agent.loadavg,
        "sw_version": agent.sw_version,
        "first_seen": iso(agent.first_seen),
        "last_heartbeat": iso(agent.last_heartbeat),
        "seconds_since_heartbeat": round(age, 3),
        "broker_unreachable_since": iso(agent.broker_lost_at),
        "agent": agent.agent,
    }


def registered_agent_to_dict(agent: Agent, nodes: list[dict[str, Any]],
                             broker: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """A registered agent: enabled, disabled or revoked, its nodes, and what Redis says of it."""
    state = "revoked" if agent.revoked_at else "enabled" if agent.enabled else "disabled"
    refused = [entry for entry in (broker or {}).get("refused", [])
               if entry["account"] == agent.account]  # fmt: skip
    return {
        "name": agent.name,
        "state": state,
        "created_at": iso(agent.created_at),
        "disabled_at": iso(agent.disabled_at),
        "revoked_at": iso(agent.revoked_at),
        "nodes": [node["hostname"] for node in nodes if node["agent"] == agent.name],
        # None: this web process may not ask Redis (then nobody here knows).
        "broker_user": None if broker is None else agent.account in broker["accounts"],
        "refused_logins": sum(entry["count"] for entry in refused),
        "last_refused_seconds_ago": min((e["seconds_ago"] for e in refused), default=None),
    }


def fleet() -> list[dict[str, Any]]:
    """Every worker node that ever heartbeated, online first (for the API and the pages)."""
    offline_after = current_app.config["AGENT_OFFLINE_AFTER"]
    with db.session() as session:
        agents = session.scalars(select(AgentState).order_by(AgentState.hostname)).all()
        now = db.clock(session)  # heartbeats carry the database's clock, not this host's
        rows = [agent_to_dict(a, offline_after, now) for a in agents]
    rows.sort(key=lambda a: not a["online"])
    return rows


def agent_registry(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Registered agents, and the nodes refused work: on shared credentials while agents are
    registered, or of a disabled agent; logins the broker refused to unknown accounts."""
    settings = current_app.config["SETTINGS"]
    with db.session() as session:
        registered = session.scalars(select(Agent).order_by(Agent.name)).all()
    accounts = {agent.account for agent in registered}
    broker = agents.broker_view(settings, accounts) if registered else None
    rows = [registered_agent_to_dict(agent, nodes, broker) for agent in registered]
    states = {row["name"]: row["state"] for row in rows}
    for node in nodes:
        if node["agent"] is not None:
            state = states.get(node["agent"])
            node["takes_builds"] = state == "enabled"
            node["refused"] = None if state == "enabled" else f"agent {node['agent']} is {state}"
        else:
            live = any(state != "revoked" for state in states.values())
            node["takes_builds"] = not live
            node["refused"] = "no agent credentials" if live else None
    unknown = [entry for entry in (broker or {}).get("refused", [])
               if entry["account"] not in accounts]  # fmt: skip
    return {"registered": rows, "refused_unknown": unknown}


def task_details(task_id: int) -> dict[str, Any] | None:
    """One build with its stages, approval and commit statuses, or None (for the API and the
    pages)."""
    with db.session() as session:
        task = session.get(TaskDetail, task_id)
        if task is None:
            return None
        stages = session.scalars(select(TaskStage).where(TaskStage.task_id == task_id)).all()
        data = task_to_dict(task, list(stages), session.get(TaskApproval, task_id))
        data["commit_statuses"] = statuses.delivery_of(session, task_id)
        data["steps"] = steps_of(session, task_id, task.status.attempt)
        return data


def steps_of(session: Session, task_id: int, attempt: int) -> list[dict[str, Any]]:
    """The current run's steps in file order (none until its build stage starts)."""
    rows = session.scalars(
        select(TaskStep)
        .where(TaskStep.task_id == task_id, TaskStep.attempt == attempt)
        .order_by(TaskStep.position)
    )
    return [
        {
            "name": row.name,
            "state": row.state.value,
            "exit_code": row.exit_code,
            "image": row.image,
            "node": row.node,
            "started_at": iso(row.started_at),
            "finished_at": iso(row.finished_at),
            "reason": row.reason,
        }
        for row in rows
    ]


@bp.get("/agents")
def list_agents() -> Response:
    """Every worker node that ever heartbeated, online first, and the registered agents."""
    nodes = fleet()
    return jsonify(agents=nodes, **agent_registry(nodes))


@bp.get("/tasks")
def list_tasks() -> Response:
    """Builds, newest first; filter with ``project``, ``branch``, ``tag``, ``state``."""
    query = (
        select(TaskDetail)
        .join(TaskDetail.status)
        .options(contains_eager(TaskDetail.status))
        .order_by(TaskDetail.id.desc())
    )
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
    data = task_details(task_id)
    return jsonify(data) if data is not None else _error(404, f"no task {task_id}")


@bp.get("/tasks/<int:task_id>/log")
def get_log(task_id: int) -> Response:
    """The build's log so far as plain text; ``?follow=1`` streams it live (Server-Sent Events).

    The log is the current run's (a build run again after its agent was taken
    for dead has one log per run); ``?attempt=N`` gives run N's, an earlier
    run's marked as such at the top. The ``X-OpsCD-Attempt`` header says which.

    The stream sends each new chunk as an event whose ``id`` is the chunk's
    row id (a reconnecting client sends ``Last-Event-ID`` and misses nothing),
    and an ``end`` event with the final state once the build is finished. A
    step's output comes as ``step`` events whose first data line is the step's
    name; ``?step=NAME`` gives only that step's section of the plain log.
    """
    with db.session() as session:
        status = session.get(TaskStatus, task_id)
        if status is None:
            return _error(404, f"no task {task_id}")
        if request.args.get("follow") not in ("1", "true", "yes"):
            attempt = request.args.get("attempt", default=status.attempt, type=int)
            if not 1 <= attempt <= status.attempt:
                return _error(404, f"task {task_id} has no run {attempt} (runs 1 to "
                                   f"{status.attempt})")  # fmt: skip
            query = select(TaskLog.content).where(
                TaskLog.task_id == task_id, TaskLog.attempt == attempt
            )
            step = request.args.get("step")
            if step is not None:
                known = session.scalar(
                    select(TaskStep.name).where(TaskStep.task_id == task_id, TaskStep.name == step)
                )
                if known is None:
                    return _error(404, f"task {task_id} has no step {step[:64]!r}")
                query = query.where(TaskLog.step == step)
            chunks = session.scalars(query.order_by(TaskLog.id))
            earlier = (
                f"[opscd] run {attempt} of build {task_id}, replaced by run {status.attempt}: "
                "not the build's result\n"
                if attempt < status.attempt
                else ""
            )
            response = Response(earlier + "".join(chunks), mimetype="text/plain")
            response.headers["X-OpsCD-Attempt"] = str(attempt)
            return response
    last_event = request.headers.get("Last-Event-ID", "").strip() or "0"
    if not last_event.isdecimal() or len(last_event) > 18:
        return _error(400, "Last-Event-ID must be the id of an event this stream sent (a number)")
    after = int(last_event)
    # A stream holds one of the process's threads: at most STREAM_SLOTS of them, each for
    # STREAM_SECONDS, so no number of viewers can keep a webhook waiting. A viewer beyond
    # them gets what is there now; EventSource (and ``cicd logs -f``) then reconnects with
    # Last-Event-ID and misses nothing.
    held = _STREAMS.acquire(blocking=False)
    response = Response(_follow(task_id, after, held), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # tell proxies not to hold events back
    return response


FOLLOW_POLL_SECONDS = 0.1
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
FOLLOW_KEEPALIVE_SECONDS = 15
#: Live streams one web process serves at once (it has 8 threads), and how long each lasts.
STREAM_SLOTS = 3
STREAM_SECONDS = 30
#: How soon a client whose stream ended (or got no slot) reconnects, in milliseconds.
RECONNECT_MS = 1000
_STREAMS = threading.BoundedSemaphore(STREAM_SLOTS)


def _follow(task_id: int, after: int, held: bool) -> Iterator[str]:
    """New log rows as SSE events until the task is finished and everything was sent, for
    STREAM_SECONDS at most with a stream slot (``held``, released here), else one round."""
    try:
        yield f"retry: {RECONNECT_MS}\n\n"  # the first bytes at once
        yield from _follow_rows(task_id, after, STREAM_SECONDS if held else 0)
    finally:
        if held:
            _STREAMS.release()


def _follow_rows(task_id: int, after: int, lifetime: float) -> Iterator[str]:
    started = quiet_since = time.monotonic()
    while True:
        with db.session() as session:
            state, attempt = session.execute(
                select(TaskStatus.state, TaskStatus.attempt).where(TaskStatus.task_id == task_id)
            ).one()
            rows = session.execute(  # the current run's: a rerun's log replaces the first's
                select(TaskLog.id, TaskLog.content, TaskLog.step)
                .where(TaskLog.task_id == task_id, TaskLog.attempt == attempt, TaskLog.id > after)
                .order_by(TaskLog.id)
            ).all()
        for row_id, content, step in rows:
            after = row_id
            # EventSource ends a line at \r too: split there, or the rest is lost.
            data = "\n".join(f"data: {line}" for line in _LINE_BREAKS.split(content))
            if step is None:
                yield f"id: {row_id}\n{data}\n\n"
            else:  # a step's output: a "step" event, its first data line the step's name
                yield f"id: {row_id}\nevent: step\ndata: {step}\n{data}\n\n"
        if rows:
            quiet_since = time.monotonic()
        elif state is not None and state.finished:
            yield f"event: end\ndata: {state.value}\n\n"
            return
        elif time.monotonic() - quiet_since > FOLLOW_KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if time.monotonic() - started >= lifetime:
            return  # the client reconnects with Last-Event-ID
        time.sleep(FOLLOW_POLL_SECONDS)


@bp.post("/tasks/<int:task_id>/cancel")
def cancel_task(task_id: int) -> Response:
    """Stop a queued or running build: its state becomes ``canceled`` at once.

    A running build script is killed (process group or container) within a
    second or two by its executor; stages still queued are revoked and, should
    one be delivered anyway, refuse to start.
    """
    with db.session() as session:
        status = session.scalar(
            select(TaskStatus).where(TaskStatus.task_id == task_id).with_for_update()
        )
        if status is None:
            return _error(404, f"no task {task_id}")
        was_waiting = status.state is TaskState.WAITING
        if not lifecycle.cancel(session, task_id):
            return _error(409, f"task {task_id} is already {status.state.value}")
        approval = session.get(TaskApproval, task_id) if was_waiting else None
        session.commit()
    revoke_build(task_id)
    if approval is not None:  # its workspace waits on a node: let publish clean it up
        try:
            send_publish(task_id, approval.node, json.loads(approval.context))
        except BrokerUnavailable:
            pass
    return get_task(task_id)


@bp.post("/tasks/<int:task_id>/retry")
def retry_task(task_id: int) -> Response:
    """Run the same commit again as a new task (``retry_of`` points back); ``?from=failed``
    skips the steps that succeeded in it (they show as reused; the checkout is made again,
    so nothing they wrote is there)."""
    reuse = request.args.get("from")
    if reuse not in (None, "failed"):
        return _error(400, f"from must be 'failed' (or absent), not {reuse[:32]!r}")
    with db.session() as session:
        task = session.get(TaskDetail, task_id)
        if task is None:
            return _error(404, f"no task {task_id}")
        reused = None
        if reuse == "failed":
            if task.status.state is not TaskState.FAILED:
                return _error(409, f"task {task_id} is {task.status.state.value}: only a "
                                   "failed build is retried from its failed step")  # fmt: skip
            reused = task.id
        copy = lifecycle.accept(
            TaskDetail(
                **{column: getattr(task, column) for column in RETRY_COPIES},
                retry_of=task.id,
                reuse_steps_of=reused,
            ),
            statuses.reports(projects.governing(session, task.project)),
        )
        session.add(copy)
        session.commit()
        new_id = copy.id
    try:
        send_task(new_id)
    except BrokerUnavailable:
        return _error(
            503, f"broker unavailable; task {new_id} is recorded and sent once it is back"
        )
    response = get_task(new_id)
    response.status_code = 202
    return response


@bp.post("/tasks/<int:task_id>/approve")
def approve_task(task_id: int) -> Response:
    """Let a ``waiting`` build publish: its publish stage goes to the node with its workspace."""
    return _decide(task_id, ApprovalDecision.APPROVED)


@bp.post("/tasks/<int:task_id>/reject")
def reject_task(task_id: int) -> Response:
    """End a ``waiting`` build without publishing: ``canceled``, its workspace removed."""
    return _decide(task_id, ApprovalDecision.REJECTED)


def _decide(task_id: int, decision: ApprovalDecision) -> Response:
    who = g.get("user") or request.remote_addr or "anonymous"
    with db.session() as session:
        status = session.scalar(
            select(TaskStatus).where(TaskStatus.task_id == task_id).with_for_update()
        )
        if status is None:
            return _error(404, f"no task {task_id}")
        approval = session.get(TaskApproval, task_id)
        if status.state is not TaskState.WAITING or approval is None:
            return _error(409, f"task {task_id} is {status.state.value}, not waiting for approval")
        approval.decision, approval.decided_by, approval.decided_at = decision, who, utcnow()
        if decision is ApprovalDecision.APPROVED:
            lifecycle.approve(session, task_id)
        else:
            lifecycle.reject(session, task_id, who)
        node, ctx = approval.node, json.loads(approval.context)
        session.commit()
    try:
        # A rejected build's publish finds it canceled and only removes the workspace.
        send_publish(task_id, node, ctx)
    except BrokerUnavailable:
        if decision is ApprovalDecision.APPROVED:
            _undo_approval(task_id)
            return _error(503, "broker unavailable; the build is still waiting, try again")
    return get_task(task_id)


def _undo_approval(task_id: int) -> None:
    with db.session() as session:
        approval = session.get(TaskApproval, task_id)
        approval.decision = approval.decided_by = approval.decided_at = None
        lifecycle.unapprove(session, task_id)
        session.commit()


# --- registered projects: the webhook secret is shown once, at registration or rotation ---------


def project_to_dict(project: Project) -> dict[str, Any]:
    """A registration: never its webhook secret or its git password."""
    return {
        "project": project.path,
        "namespace": project.path.endswith("/*"),
        "forge": project.forge,
        "forge_project_id": project.forge_project_id,
        "clone_url": project.clone_url,
        "protected": projects.patterns(project.protected_refs),
        "approval": projects.patterns(project.approval_refs),
        "fork_mrs": project.fork_mrs,
        "git_username": project.git_username,
        "own_git_password": project.git_password_ciphertext is not None,
        "api_url": statuses.api_url_of(project),
        "reports_statuses": statuses.reports(project),
        "created_at": iso(project.created_at),
        "updated_at": iso(project.updated_at),
    }


def _registered(registered: projects.Registered, status: int) -> Response:
    response = jsonify(
        project=project_to_dict(registered.project),
        webhook_url=external_url(f"webhook.{registered.project.forge}_webhook"),
        webhook_secret=registered.webhook_secret,
    )
    response.status_code = status
    return response


def _project_error(error: projects.ProjectError) -> Response:
    return _error(error.status, str(error))


@bp.get("/projects")
def list_registered_projects() -> Response:
    return jsonify(projects=[project_to_dict(p) for p in projects.list_projects()])


@bp.post("/projects")
def register_project() -> Response:
    """Register ``{"project", "clone_url", "forge"?, "protected"?, "approval"?, "fork_mrs"?,
    "git_username"?, "git_password"?, "api_url"?, "api_token"?}``; the answer holds the
    webhook URL and secret, shown this once."""
    body = request.get_json(silent=True)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("project"), str)
        or not isinstance(body.get("clone_url"), str)
    ):
        return _error(400, 'send a JSON object {"project": "group/app", "clone_url": "https://…"}')
    try:
        registered = projects.register(
            body["project"], body["clone_url"], protected=body.get("protected", "main"),
            approval=body.get("approval", ""), git_username=body.get("git_username"),
            git_password=body.get("git_password"), key=current_app.config["SETTINGS"].secrets_key,
            api_url=body.get("api_url"), api_token=body.get("api_token"),
            forge=str(body.get("forge", "gitlab")), fork_mrs=str(body.get("fork_mrs", "off")),
        )  # fmt: skip
    except projects.ProjectError as error:
        return _project_error(error)
    except ConfigError as error:
        return _error(503, str(error))
    return _registered(registered, 201)


@bp.get("/projects/<path:path>")
def get_registered_project(path: str) -> Response:
    try:
        return jsonify(project_to_dict(projects.get(path)))
    except projects.ProjectError as error:
        return _project_error(error)


@bp.patch("/projects/<path:path>")
def update_registered_project(path: str) -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return _error(400, "send a JSON object of the fields to change")
    try:
        changed = projects.update(path, body, key=current_app.config["SETTINGS"].secrets_key)
    except projects.ProjectError as error:
        return _project_error(error)
    except ConfigError as error:
        return _error(503, str(error))
    return jsonify(project_to_dict(changed))


@bp.delete("/projects/<path:path>")
def remove_registered_project(path: str) -> Response:
    try:
        projects.remove(path)
    except projects.ProjectError as error:
        return _project_error(error)
    return Response(status=204)


@bp.post("/projects/<path:path>/rotate-secret")
def rotate_project_secret(path: str) -> Response:
    try:
        key = current_app.config["SETTINGS"].secrets_key
        return _registered(projects.rotate_secret(path, key), 200)
    except projects.ProjectError as error:
        return _project_error(error)
    except ConfigError as error:
        return _error(503, str(error))


# --- project secrets: names and dates out, values only in ------------------------------------


@bp.get("/projects/<path:project>/secrets")
def list_project_secrets(project: str) -> Response:
    rows = secrets.list_secrets(project)
    return jsonify(
        project=project,
        secrets=[
            {"name": r.name, "created_at": iso(r.created_at), "updated_at": iso(r.updated_at)}
            for r in rows
        ],
    )


@bp.put("/projects/<path:project>/secrets/<name>")
def put_project_secret(project: str, name: str) -> Response:
    """Store a secret from ``{"value": "..."}``; the answer never contains the value."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("value"), str):
        return _error(400, 'send a JSON object {"value": "..."}')
    try:
        created = secrets.set_secret(
            project, name, body["value"], current_app.config["SETTINGS"].secrets_key
        )
    except secrets.SecretError as error:
        return _error(400, str(error))
    except ConfigError as error:
        return _error(503, str(error))
    response = jsonify(project=project, name=name, created=created)
    response.status_code = 201 if created else 200
    return response


@bp.delete("/projects/<path:project>/secrets/<name>")
def delete_project_secret(project: str, name: str) -> Response:
    if not secrets.delete_secret(project, name):
        return _error(404, f"no secret {name} in {project}")
    return Response(status=204)


# --- dependency caches: kept on the agents' disks, listed and cleared through their rows ---


def cache_to_dict(row: ProjectCache) -> dict[str, Any]:
    return {
        "key": row.cache_key, "size_bytes": row.size_bytes, "node": row.node,
        "store": row.store, "task_id": row.task_id, "saved_at": iso(row.saved_at),
        "used_at": iso(row.used_at),
    }  # fmt: skip


@bp.get("/projects/<path:project>/caches")
def list_project_caches(project: str) -> Response:
    """The dependency caches the agents keep for ``project``, most recently used first."""
    with db.session() as session:
        rows = session.scalars(
            select(ProjectCache)
            .where(ProjectCache.project == project)
            .order_by(ProjectCache.used_at.desc(), ProjectCache.cache_key)
        ).all()
        return jsonify(project=project, caches=[cache_to_dict(row) for row in rows])


@bp.delete("/projects/<path:project>/caches")
def clear_project_caches(project: str) -> Response:
    """Clear ``project``'s caches on every agent: an agent restores a cache only while its row
    exists, and removes the file at its next use or eviction."""
    with db.session() as session:
        cleared = session.execute(
            delete(ProjectCache).where(ProjectCache.project == project)
        ).rowcount
        session.commit()
    return jsonify(project=project, cleared=cleared)


#: What a retry copies from the task it runs again; the delivery id stays with the first.
RETRY_COPIES = (
    "forge", "project", "clone_url", "web_url", "ref_type", "ref_name", "commit_sha",
    "before_sha", "commit_message", "commit_author", "pusher", "merge_request_iid",
    "target_project", "fork_of", "head_ref",
)  # fmt: skip
