"""The web dashboard: server-rendered pages over the same database the API reads.

Why pages in the Flask app itself rather than a separate front end: OpsCD is
self-hosted and should stay one ``pip install``, with no Node toolchain, build
step or CDN. So the pages are Jinja templates (autoescaped: every name, branch,
commit message and error is text, never markup), a small stylesheet and plain
JavaScript from ``static/`` (served under ``/assets``). The lists (builds, agents, projects) keep
themselves current by fetching their own table again as a fragment
(``?partial=1``, the same template the page was rendered with, so there is one
way to draw a row); the build page follows its task through the JSON API
(``GET /api/tasks/<id>``) and its log through the API's Server-Sent Events, and
its buttons call the API's ``cancel``/``retry``/``approve``/``reject``.

``/badge.svg?project=&branch=`` is a shields-style status badge for READMEs.
Login, when ``CICD_UI_PASSWORD`` is set, is ``create_app``'s, not this module's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request
from sqlalchemy import Select, func, select
from sqlalchemy.orm import contains_eager

from cicd import __version__, db
from cicd import projects as registry
from cicd.models import (
    RefType,
    TaskDetail,
    TaskState,
    TaskStatus,
    utcnow,
)
from cicd.web.api import agent_registry, fleet, project_to_dict, task_details, task_to_dict

__all__ = ["bp"]

#: Static files under ``/assets``: ``/static`` is the Flask app's own static route (the app is
#: created with the default ``static_folder``), which would shadow the blueprint's.
bp = Blueprint(
    "web", __name__, template_folder="templates", static_folder="static", static_url_path="/assets"
)

#: Builds per page unless ``?limit=`` asks otherwise (at most ``MAX_PAGE_SIZE``).
PAGE_SIZE = 25
MAX_PAGE_SIZE = 100
#: How often the pages poll, in milliseconds (read by static/opscd.js from the page).
REFRESH_MS = 3000
#: Log lines the build page keeps in the DOM; older ones are dropped (the full log is a link).
LOG_MAX_LINES = 5000
#: Task states in the order the filter offers them.
STATES = [state.value for state in TaskState]
#: Badge colours by task state (shields.io's palette); anything else is grey.
BADGE_COLOURS = {"success": "#4c1", "failed": "#e05d44", "running": "#007ec6"}
BADGE_GREY = "#9f9f9f"


# --- the pages --------------------------------------------------------------------------------


@bp.get("/")
def builds() -> str:
    """Builds, newest first: filter with ``project``, ``branch`` (or tag), ``state``;
    page with ``before`` (a task id) and ``limit``."""
    args = request.args
    filters = {name: args.get(name, "").strip() for name in ("project", "branch", "state")}
    limit = _int_arg("limit", PAGE_SIZE, 1, MAX_PAGE_SIZE)
    before = _int_arg("before", None, 1, None)
    error = None
    if filters["state"] and filters["state"] not in STATES:
        error = f"unknown state {filters['state']!r}: showing every state"
        filters["state"] = ""
    query = _builds_query(filters["project"], filters["branch"], filters["state"], before)
    with db.session() as session:
        rows = session.scalars(query.limit(limit + 1)).unique().all()
        tasks = [task_to_dict(task) for task in rows[:limit]]
        projects = [] if args.get("partial") else _project_names(session)
    now = utcnow()
    for task in tasks:
        task["elapsed"] = _elapsed(task, now)
    page_args: dict[str, Any] = {name: value for name, value in filters.items() if value}
    if limit != PAGE_SIZE:
        page_args["limit"] = limit
    context = {
        "tasks": tasks,
        "filters": filters,
        "limit": limit,
        "before": before,
        "older": tasks[-1]["task_id"] if len(rows) > limit else None,
        "page_args": page_args,
        "page_size": PAGE_SIZE,
        "error": error,
    }
    if args.get("partial"):
        return render_template("_builds.html", **context)
    return render_template("builds.html", projects=projects, states=STATES, **context)


@bp.get("/tasks/<int:task_id>")
def task_page(task_id: int) -> str | tuple[str, int]:
    """One build: its stages as a timeline, commit, image, error, buttons and live log."""
    data = task_details(task_id)
    if data is None:
        return render_template("not_found.html", what=f"build #{task_id}"), 404
    now = utcnow()
    data["elapsed"] = _elapsed(data, now)
    for item in [*data["stages"], *data["steps"]]:
        item["elapsed"] = _elapsed(item, now)
    return render_template("task.html", task=data, log_max_lines=LOG_MAX_LINES)


@bp.get("/agents")
def agents() -> str:
    """The worker nodes, online first, as ``GET /api/agents`` lists them."""
    template = "_agents.html" if request.args.get("partial") else "agents.html"
    nodes = fleet()
    return render_template(template, agents=nodes, **agent_registry(nodes),
                           offline_after=current_app.config["AGENT_OFFLINE_AFTER"])  # fmt: skip


@bp.get("/projects")
def projects() -> str:
    """The registered projects (and a form to register one), then the last build of every
    branch of every project, with its badge."""
    registered = [project_to_dict(project) for project in registry.list_projects()]
    if request.args.get("partial") == "registrations":
        return render_template("_registrations.html", registered=registered)
    with db.session() as session:
        tasks = [task_to_dict(task) for task in session.scalars(_last_builds_query()).unique()]
    grouped: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        grouped.setdefault(task["project"], []).append(task)
    template = "_projects.html" if request.args.get("partial") else "projects.html"
    return render_template(template, projects=grouped, registered=registered)


@bp.get("/badge.svg")
def badge() -> Response:
    """A shields-style "build | <state>" badge of a project's (branch's) last build."""
    project = request.args.get("project", "")
    branch = request.args.get("branch", "")
    query = select(TaskStatus.state).join(TaskDetail, TaskDetail.id == TaskStatus.task_id)
    query = query.where(TaskDetail.project == project)
    if branch:
        query = query.where(TaskDetail.ref_type == RefType.BRANCH, TaskDetail.ref_name == branch)
    with db.session() as session:
        state = session.scalar(query.order_by(TaskDetail.id.desc()).limit(1))
    message = state.value if state is not None else "unknown"
    svg = render_template("badge.svg", **_badge_layout("build", message))
    response = Response(svg, mimetype="image/svg+xml")
    response.headers["Cache-Control"] = "no-cache"
    return response


# --- queries ----------------------------------------------------------------------------------


def _builds_query(project: str, ref_name: str, state: str, before: int | None) -> Select:
    """Builds newest first, their status from the same join (one query per page)."""
    query = (
        select(TaskDetail)
        .join(TaskDetail.status)
        .options(contains_eager(TaskDetail.status))
        .order_by(TaskDetail.id.desc())
    )
    if project:
        query = query.where(TaskDetail.project == project)
    if ref_name:
        query = query.where(TaskDetail.ref_name == ref_name)
    if state:
        query = query.where(TaskStatus.state == TaskState(state))
    if before is not None:
        query = query.where(TaskDetail.id < before)
    return query


def _last_builds_query() -> Select:
    """The newest task of each (project, branch): one query, on the (project, ref_name) index."""
    newest = (
        select(func.max(TaskDetail.id))
        .where(TaskDetail.ref_type == RefType.BRANCH)
        .group_by(TaskDetail.project, TaskDetail.ref_name)
    )
    return (
        select(TaskDetail)
        .join(TaskDetail.status)
        .options(contains_eager(TaskDetail.status))
        .where(TaskDetail.id.in_(newest))
        .order_by(TaskDetail.project, TaskDetail.ref_name)
    )


def _project_names(session: Any) -> list[str]:
    """Every project that has a build, for the filter's suggestions."""
    return list(session.scalars(select(TaskDetail.project).distinct().order_by(TaskDetail.project)))


def _int_arg(name: str, default: int | None, low: int, high: int | None) -> int | None:
    """A positive integer query argument, clamped; anything unreadable is the default."""
    try:
        value = int(request.args[name])
    except (KeyError, ValueError):
        return default
    value = max(value, low)
    return min(value, high) if high is not None else value


# --- shown values -----------------------------------------------------------------------------


def _parse_iso(value: str | None) -> dt.datetime | None:
    """The API's ``...Z`` timestamps back to the naive UTC the database keeps."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.removesuffix("Z"))


def _elapsed(item: dict[str, Any], now: dt.datetime) -> float | None:
    """Seconds from ``started_at`` to ``finished_at``, or to now while it runs."""
    started = _parse_iso(item.get("started_at"))
    if started is None:
        return None
    finished = _parse_iso(item.get("finished_at")) or now
    return max((finished - started).total_seconds(), 0.0)


@bp.app_template_filter("duration")
def format_duration(seconds: float | None) -> str:
    """``4.2s``, ``1m 05s``, ``2h 03m``; empty for nothing."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


@bp.app_template_filter("ago")
def format_ago(value: str | float | None) -> str:
    """How long ago an ISO timestamp (or that many seconds) was: ``12s ago``, ``5 min ago``."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        then = _parse_iso(value)
        seconds = (utcnow() - then).total_seconds() if then else 0.0
    else:
        seconds = float(value)
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s ago" if seconds >= 1 else "just now"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h ago"
    days = seconds // 86400
    return f"{days:.0f} day{'s' if days >= 2 else ''} ago"


@bp.app_template_filter("when")
def format_when(value: str | None) -> str:
    """An ISO timestamp as ``2024-05-01 12:03:04 UTC``."""
    moment = _parse_iso(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


@bp.app_context_processor
def page_globals() -> dict[str, Any]:
    """What every page may use: the version (cache-busts the static files), the poll
    interval and the base of absolute links (``CICD_PUBLIC_URL`` or this request's host)."""
    base = current_app.config.get("PUBLIC_URL") or (request.host_url if request else "")
    return {"opscd_version": __version__, "refresh_ms": REFRESH_MS, "public_base": base.rstrip("/")}


# --- the badge --------------------------------------------------------------------------------

#: Rough advance widths of Verdana 11px (what shields measures with), by character class.
_NARROW, _WIDE = set("fijlrtI1 .,:;!|'()[]"), set("mwMW@%")


def _text_width(text: str) -> int:
    return round(sum(3.9 if c in _NARROW else 9.5 if c in _WIDE else 6.8 for c in text))


def _badge_layout(label: str, message: str) -> dict[str, Any]:
    """Sizes and colour of the two halves; the template escapes the text."""
    left, right = _text_width(label) + 12, _text_width(message) + 12
    return {
        "label": label,
        "message": message,
        "colour": BADGE_COLOURS.get(message, BADGE_GREY),
        "left": left,
        "right": right,
        "width": left + right,
        "label_x": left / 2,
        "message_x": left + right / 2,
    }
