"""The build stages, one module each: clone → build → publish.

Each stage is a Celery task taking and returning a plain ``ctx`` dict (JSON
through the broker: ``task_id``, ``workspace``, and what later stages need).
:class:`StageTask` holds what they share: on failure the error is written to the
build log and the workspace is removed; state changes are the signals' job
(:mod:`workers.signals`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject
from sqlalchemy import select
from sqlalchemy.orm import Session

from cicd import db, projects
from cicd.config import load_settings
from cicd.errors import BuildCanceled, LeaseLost, OpsCDError, StageError
from cicd.models import (
    Stage,
    StageState,
    StepState,
    TaskDetail,
    TaskStage,
    TaskState,
    TaskStatus,
    TaskStep,
)
from workers import capacity, lease, reaper
from workers.logs import LogWriter, Masker, record_superseded, stored_log_bytes, task_log_store
from workers.workspace import checkout_dir, remove_workspace, workspace_of

__all__ = [
    "StageTask", "masker", "describe_error", "current_run", "is_canceled", "is_stale",
    "build_variables", "TaskRecord", "task_record", "task_workspace", "write_changed_files",
    "read_changed_files", "reused_steps", "REUSED",
]  # fmt: skip

log = logging.getLogger(__name__)


@functools.cache
def masker() -> Masker:
    """Masks every credential this worker knows."""
    return Masker(load_settings().secrets())


def build_variables(task: TaskDetail) -> dict[str, str]:
    """The ``CI_*`` variables every build sees, named as GitLab CI names them."""
    variables = {
        "CI": "true",
        "OPSCD": "true",
        "CI_TASK_ID": str(task.id),
        "CI_PROJECT_PATH": task.project,
        "CI_COMMIT_SHA": task.commit_sha,
        "CI_COMMIT_SHORT_SHA": task.commit_sha[:8],
        "CI_COMMIT_REF_NAME": task.ref_name,
    }
    variables["CI_COMMIT_TAG" if task.ref_type == "tag" else "CI_COMMIT_BRANCH"] = task.ref_name
    variables["CI_PIPELINE_SOURCE"] = "push"
    if task.merge_request_iid is not None:
        variables.update(
            CI_PIPELINE_SOURCE="merge_request_event",
            CI_MERGE_REQUEST_IID=str(task.merge_request_iid),
            CI_MERGE_REQUEST_SOURCE_BRANCH_NAME=task.ref_name,
            CI_MERGE_REQUEST_SOURCE_PROJECT_PATH=task.fork_of or task.project,
        )
    return variables


@dataclass(frozen=True)
class TaskRecord:
    """What a stage knows of its build, all from the database: its ``CI_*`` variables and
    what the project's registration decides for its ref."""

    variables: dict[str, str]
    #: The ref is one of the registration's protected refs: secrets, image overwrites.
    protected: bool
    #: The registration's approval patterns cover the ref: publish waits for a person.
    approval_required: bool
    #: Why this build gets no secret variables (its ref is not protected, it comes from a
    #: fork), or None.
    secrets_withheld: str | None = None
    #: Why this build publishes no image whatever its ci.yaml says (a merge request's), or
    #: None.
    no_publish: str | None = None
    #: A retry from the failed step: the steps not run again, each with why.
    reused_steps: dict[str, str] = field(default_factory=dict)
    #: The project's main branch, whose dependency cache a build reads when its own key
    #: has none; and why this build writes no cache (None: it does, a protected ref's).
    cache_fallback: str | None = None
    cache_read_only: str | None = None


def task_record(task_id: int) -> TaskRecord:
    """The build as its rows say: a broker message never decides the project (and with it
    the secrets a build gets), the ref, the commit, or the policy that applies."""

    def read() -> TaskRecord:
        with db.session() as session:
            task = session.get(TaskDetail, task_id)
            if task is None:
                raise StageError("build", f"task {task_id} is not in the database")
            registration = projects.governing(session, task.project)
            if registration is None:
                raise StageError("build", f"project {task.project} is not registered any more")
            ref_type = task.ref_type.value
            # A fork's branch may be named like a protected one: it is never protected.
            fork = task.fork_of is not None
            protected = not fork and projects.is_protected(registration, ref_type, task.ref_name)
            withheld = no_publish = None
            other = task.target_project not in (None, task.project)
            if fork:
                withheld = f"a merge request from the fork {task.fork_of}"
                no_publish = f"a merge request from the fork {task.fork_of} publishes nothing"
            elif other:  # the target's webhook secret cannot vouch for this project's secrets
                withheld = f"a merge request into {task.target_project}, delivered by its webhook"
            elif not protected:
                withheld = (f"{task.ref_name} is not a protected ref of this project; "
                            f"protected: {registration.protected_refs or 'none'}")  # fmt: skip
            if task.merge_request_iid is not None and no_publish is None:
                no_publish = ("a merge request build publishes nothing (the push of its "
                              "branch does)")  # fmt: skip
            read_only = None
            if task.merge_request_iid is not None:
                read_only = "a merge request's build"
            elif not protected:
                read_only = withheld or f"{task.ref_name} is not a protected ref"
            return TaskRecord(
                cache_fallback=projects.main_branch(registration),
                cache_read_only=read_only,
                reused_steps=reused_steps(session, task.reuse_steps_of),
                variables=build_variables(task),
                protected=protected,
                approval_required=projects.needs_approval(registration, ref_type, task.ref_name),
                secrets_withheld=withheld,
                no_publish=no_publish,
            )

    return db.retrying(read, f"task {task_id}: reading the build")


#: The clone stage's list of the files the push changed, beside the checkout (NUL-separated).
CHANGED_FILES = "changed-files"


def write_changed_files(workspace: Path, paths: list[str] | None) -> None:
    """Keep what the push changed for the build stage on this node (None: unknown)."""
    target = workspace / CHANGED_FILES
    if paths is None:
        target.unlink(missing_ok=True)
    else:
        target.write_bytes(b"\0".join(path.encode() for path in paths))


def read_changed_files(workspace: Path) -> tuple[str, ...] | None:
    """The files the push changed, as the clone stage found them; None when unknown (then
    every ``when.path`` condition holds)."""
    try:
        data = (workspace / CHANGED_FILES).read_bytes()
    except FileNotFoundError:
        return None
    return tuple(path.decode("utf-8", "surrogateescape") for path in data.split(b"\0") if path)


#: How a reused step's reason starts (a retry of a retry reuses them too).
REUSED = "reused: "


def reused_steps(session: Session, task_id: int | None) -> dict[str, str]:
    """The steps that succeeded in build ``task_id`` (or were reused there), by name, with the
    reason a retry from its failed step shows for each."""
    if task_id is None:
        return {}
    attempt = select(TaskStatus.attempt).where(TaskStatus.task_id == task_id).scalar_subquery()
    rows = session.execute(
        select(TaskStep.name, TaskStep.state, TaskStep.reason).where(
            TaskStep.task_id == task_id, TaskStep.attempt == attempt
        )
    ).all()
    return {
        name: reason if state is StepState.SKIPPED else f"{REUSED}it succeeded in build #{task_id}"
        for name, state, reason in rows
        if state is StepState.SUCCESS or (state is StepState.SKIPPED
                                          and (reason or "").startswith(REUSED))
    }  # fmt: skip


def task_workspace(ctx: dict[str, Any]) -> tuple[Path, Path]:
    """The workspace and checkout a message names, once checked to be this build's own on
    this agent (a message never decides a path)."""
    workspace = workspace_of(int(ctx["task_id"]), ctx.get("workspace"))
    return workspace, checkout_dir(workspace)


def current_run(task_id: int) -> tuple[TaskState, int] | None:
    """The build's state and current attempt, or None if the database cannot answer."""
    try:
        with db.session() as session:
            row = session.execute(
                select(TaskStatus.state, TaskStatus.attempt).where(TaskStatus.task_id == task_id)
            ).first()
    except Exception:
        log.warning("task %s: could not read its state", task_id, exc_info=True)
        return None
    return (row[0], row[1]) if row is not None else None


def is_canceled(task_id: int, attempt: int) -> bool:
    """Whether run ``attempt`` must stop: someone canceled the build, or another run of it
    replaced this one (its node was taken for dead). Executors ask while the script runs.

    A database that cannot answer is not a cancel: the build goes on.
    """
    found = current_run(task_id)
    return found is not None and (found[0] is TaskState.CANCELED or found[1] != attempt)


def is_stale(ctx: dict[str, Any], stage: Stage) -> bool:
    """A message that must not run: its build ended or was canceled, a newer attempt
    replaced its run, or this stage already succeeded (Redis redelivers a message
    whose acknowledgement was lost, e.g. across a broker restart)."""
    task_id = int(ctx["task_id"])

    def read() -> tuple[TaskState, int, StageState | None] | None:
        with db.session() as session:  # one query: the build's state and this stage's
            this_stage = (TaskStage.task_id == TaskStatus.task_id) & (TaskStage.stage == stage)
            row = session.execute(
                select(TaskStatus.state, TaskStatus.attempt, TaskStage.state)
                .outerjoin(TaskStage, this_stage)
                .where(TaskStatus.task_id == task_id)
            ).first()
            return (row[0], row[1], row[2]) if row is not None else None

    found = db.retrying(read, f"task {task_id}: checking its state")
    if found is None:
        return True
    state, attempt, stage_state = found
    return (
        state.finished
        or int(ctx.get("attempt", 1)) != attempt
        or stage_state in (StageState.SUCCESS, StageState.SKIPPED)
    )


def describe_error(error: BaseException) -> str:
    """The text recorded for a failed stage: ours as written, anything else with its type."""
    text = str(error) if isinstance(error, OpsCDError) else f"{type(error).__name__}: {error}"
    return masker()(text)


class StageTask(Task):
    """Base of the three stage tasks; ``stage`` says which one it is."""

    stage: Stage
    #: Stages are acknowledged when they end and requeued if the process dies
    #: (``task_acks_late`` / ``task_reject_on_worker_lost`` in the app config);
    #: a stage that raises is not retried: a failed build is a result.
    max_retries = 0

    #: Counts the node's builds before each acknowledgement (main process; see capacity).
    Request = "workers.capacity:StageRequest"

    def before_start(self, task_id: str, args: tuple, kwargs: dict) -> None:
        """A stage of a canceled build, or of an older run of it, does not start; a clone
        starts only with a free slot on this node, else it goes back to the shared queue."""
        ctx = args[0] if args and isinstance(args[0], dict) else {}
        if "task_id" not in ctx:
            return
        if is_stale(ctx, self.stage):
            if ctx.get("node") in (None, self.request.hostname):
                remove_workspace(ctx.get("workspace"))
            raise Ignore()
        node = ctx.get("node")
        if self.stage is not Stage.CLONE and node and node != self.request.hostname:
            # Another node's stage, dead-lettered out of its queue (RabbitMQ gave it back when
            # that node's connection dropped; cicd.broker.node_queue): its checkout is there,
            # so the build runs again from its clone, on any node.
            task_id, attempt = int(ctx["task_id"]), int(ctx.get("attempt", 1))
            rerun = db.retrying(lambda: reaper.rerun_dropped_build(task_id, node, attempt),
                                f"task {task_id}: running it again")  # fmt: skip
            moved_on = "" if rerun else "; the build had moved on already"
            log.info("task %s: a stage of run %s on %s came back from the broker%s",
                     task_id, attempt, node, moved_on)  # fmt: skip
            raise Ignore()
        if not lease.wait_renewed(lease.lease_length(load_settings())):
            # This node's heartbeats do not reach the database: it must not start a build,
            # which the reaper may soon run elsewhere. A clone goes back to the shared queue;
            # a later stage must run here (the checkout is here) and stops at its first check.
            if self.stage is Stage.CLONE:
                raise Reject("no lease", requeue=True)
        if self.stage is Stage.CLONE:
            self._claim_slot(int(ctx["task_id"]), int(ctx.get("attempt", 1)))

    def _claim_slot(self, task_id: int, attempt: int) -> None:
        node = capacity.node
        hostname = self.request.hostname or node.hostname or "local"
        claim = db.retrying(
            lambda: capacity.claim_slot(task_id, attempt, hostname, node.concurrency or 1),
            f"task {task_id}: claiming a slot on {hostname}",
        )
        if claim is capacity.Claim.FULL:
            log.info("task %s: %s is full; back to the shared queue", task_id, hostname)
            raise Reject("node full", requeue=True)
        if claim is capacity.Claim.REFUSED:
            log.warning("task %s: %s may take no builds; back to the shared queue", task_id,
                        hostname)  # fmt: skip
            raise Reject("agent refused", requeue=True)
        if claim is capacity.Claim.GONE:
            raise Ignore()

    def _hand_back(self, task_id: int, attempt: int) -> None:
        """A run this node stopped when its lease expired: once the database answers, it runs
        again (attempt + 1), unless another node's reaper got there first; either way its
        own log ends saying another run replaced it."""
        node = self.request.hostname or capacity.node.hostname or "local"
        try:
            db.retrying(lambda: reaper.rerun_fenced_build(task_id, node, attempt),
                        f"task {task_id}: handing back run {attempt}")  # fmt: skip
            found = current_run(task_id)
            if found is not None and found[1] != attempt:
                record_superseded(task_id, attempt, found[1])
        except Exception:  # still unreachable: the reaper or rerun_lost_builds takes it
            log.exception("task %s: could not hand back run %s", task_id, attempt)

    def log_writer(self, ctx: dict[str, Any]) -> LogWriter:
        task_id, attempt = int(ctx["task_id"]), int(ctx.get("attempt", 1))
        room = max(load_settings().max_log_bytes - stored_log_bytes(task_id, attempt), 0)
        return LogWriter(task_log_store(task_id, self.stage, attempt), masker(), max_bytes=room)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        ctx = args[0] if args and isinstance(args[0], dict) else {}
        attempt = int(ctx.get("attempt", 1))
        if "task_id" not in ctx:
            pass
        elif isinstance(exc, LeaseLost):  # no result: the build runs again
            self._hand_back(int(ctx["task_id"]), attempt)
        elif (found := current_run(int(ctx["task_id"]))) is not None and found[1] != attempt:
            # Another run replaced this one: it says so in its own log, and nothing else.
            record_superseded(int(ctx["task_id"]), attempt, found[1])
        else:
            with self.log_writer(ctx) as writer:
                if isinstance(exc, BuildCanceled):
                    writer.line(f"Canceled during {self.stage}", always=True)
                else:
                    writer.line(f"ERROR: {self.stage} failed: {describe_error(exc)}", always=True)
        try:
            remove_workspace(ctx.get("workspace"))
        except ValueError:
            log.exception("task %s: workspace not removed", ctx.get("task_id"))
