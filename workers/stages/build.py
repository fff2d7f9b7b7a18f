"""Stage 2, build: read ``ci.yaml`` from the checkout and run its steps with the executor
(:mod:`workers.steps`; a ``build:`` file is one step named ``build``).

The exit code decides: a step's non-zero one, or one killed at its timeout, fails the
task with that code (:class:`~cicd.errors.BuildFailed`); the log keeps each step's
output in its own section.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cicd import db, lifecycle
from cicd.broker import STAGE_TASKS, app
from cicd.ciyaml import Pipeline, StepContext, load_pipeline
from cicd.config import load_settings
from cicd.models import Stage, StageState, TaskApproval, TaskStage, utcnow
from cicd.secrets import secret_values
from workers.caches import BuildCache
from workers.executors import Executor, Service, get_executor
from workers.logs import LogWriter
from workers.stages import (
    StageTask,
    is_canceled,
    read_changed_files,
    task_record,
    task_workspace,
)
from workers.steps import BuildRun, StepRecords, TaskStepRecords, database_step_log, run_steps

__all__ = ["build", "run_build", "step_context"]


def run_build(
    checkout: Path,
    variables: dict[str, str],
    executor: Executor,
    log: LogWriter,
    canceled: Callable[[], bool] = lambda: False,
    node: str | None = None,
    secrets: Callable[[list[str]], dict[str, str]] | None = None,
    withheld: str | None = None,
    records: StepRecords | None = None,
    step_log: Callable[[str], LogWriter] | None = None,
    changed_files: tuple[str, ...] | None = None,
    reused: dict[str, str] | None = None,
    cache: BuildCache | None = None,
) -> Pipeline:
    """Read ci.yaml, run its steps (a ``build:`` file: its one step), raise unless the build
    succeeded; return the pipeline.

    ``secrets`` looks up the secret variables the steps name; by default the
    project's, stored encrypted on the server. ``withheld`` is why this build
    gets none (its ref is not protected), which the log then says. ``records``
    and ``step_log`` take each step's state and output (default: none, and the
    stage's own log); ``changed_files`` are what ``when.path`` is decided on;
    ``reused`` the steps a retry from the failed step does not run again; ``cache``
    restores the dependency cache before the steps and saves it once they succeeded.
    """
    settings = load_settings()
    pipeline = load_pipeline(checkout)
    tool_environment = cache.restore(pipeline, checkout, log) if cache is not None else {}
    steps = pipeline.steps_to_run
    project = variables.get("CI_PROJECT_PATH", "")
    lookup = secrets or (lambda names: secret_values(project, names, settings.secrets_key))
    names = list(dict.fromkeys(name for spec in steps for name in spec.secrets))
    secret_env = {}
    if names and withheld:
        log.line(f"Secret variables withheld: {', '.join(names)} ({withheld})")
    elif names:
        secret_env = lookup(names)
    log.mask = log.mask.with_secrets(secret_env.values())
    if len(steps) > 1:
        log.line(f"Running {len(steps)} steps, at most {settings.step_concurrency} at once")

    def same_log(name: str) -> LogWriter:  # without sections: the stage's own writer
        return log  # (closing a writer only stores what it holds; it goes on writing)

    run = BuildRun(
        checkout=checkout, variables=variables, executor=executor, settings=settings,
        log=log, step_log=step_log or same_log, context=step_context(
            variables, changed_files), records=records or StepRecords(), canceled=canceled,
        node=node, secret_values=secret_env, reused=reused or {},
        shorthand=pipeline.steps is None, tool_environment=tool_environment,
    )  # fmt: skip
    if not pipeline.services:
        run_steps(pipeline, run)
    else:
        services = [Service(name=s.name, image=s.image, environment=dict(s.environment),
                            commands=list(s.commands) if s.commands else None)
                    for s in pipeline.services]  # fmt: skip
        build = variables.get("CI_TASK_ID", "local")
        with executor.services(build, services, checkout.parent, log.write) as started:
            log.line(f"Services {', '.join(started.names)} are up; the steps reach them by name")
            run_steps(pipeline, replace(run, services=started))
    if cache is not None:  # run_steps raised unless the build succeeded
        cache.save(checkout, log)
    return pipeline


def step_context(variables: dict[str, str], changed_files: tuple[str, ...] | None) -> StepContext:
    """What the steps' ``when`` is decided on, from the build's own variables."""
    if variables.get("CI_PIPELINE_SOURCE") == "merge_request_event":
        event = "merge_request"
    else:
        event = "tag" if "CI_COMMIT_TAG" in variables else "push"
    return StepContext(event=event, branch=variables.get("CI_COMMIT_BRANCH"),
                       tag=variables.get("CI_COMMIT_TAG"), changed_files=changed_files,
                       failed=False)  # fmt: skip


@app.task(name=STAGE_TASKS["build"], base=StageTask, bind=True, stage=Stage.BUILD)
def build(self: StageTask, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run the build's steps on this node; pass the parsed pipeline on to publish."""
    node, run = self.request.hostname, int(ctx.get("attempt", 1))
    task_id = int(ctx["task_id"])
    record = task_record(task_id)  # the database's, not the message's
    variables = record.variables
    workspace, checkout = task_workspace(ctx)
    with self.log_writer(ctx) as log:
        pipeline = run_build(
            checkout,
            variables,
            get_executor(load_settings(), node),
            log,
            canceled=functools.partial(is_canceled, task_id, run),
            node=node,
            withheld=record.secrets_withheld,
            records=TaskStepRecords(task_id, run),
            step_log=database_step_log(task_id, run, log),
            changed_files=read_changed_files(workspace),
            reused=record.reused_steps,
            cache=BuildCache(
                settings=load_settings(),
                project=variables["CI_PROJECT_PATH"],
                ref_name=variables["CI_COMMIT_REF_NAME"],
                fallback=record.cache_fallback,
                read_only=record.cache_read_only,
                node=node,
                task_id=task_id,
            ),
        )
        # The message carries ids only: ci.yaml's env values (and the rest) stay out of the
        # broker, Flower and task_approvals.context; publish reads ci.yaml again.
        publish = pipeline.publish if record.no_publish is None else None
        # The server's approval rule always applies; ci.yaml may only add one.
        ref_name = variables["CI_COMMIT_REF_NAME"]
        if publish is not None and (record.approval_required or publish.needs_approval(ref_name)):
            # Stop the chain here: the build holds no slot while a person decides.
            # The workspace stays on this node; approving sends publish back here.
            self.request.chain = None
            request_approval(int(ctx["task_id"]), node, ctx)
            log.line("Build succeeded; publishing waits for approval")
    return ctx


def request_approval(task_id: int, node: str, ctx: dict[str, Any]) -> None:
    """Record what publish resumes with, and put the task in ``waiting`` with its build stage
    ended, in one transaction: nobody sees a waiting build whose build stage still runs."""
    with db.session() as session:
        session.merge(TaskApproval(task_id=task_id, node=node, context=json.dumps(ctx)))
        if lifecycle.wait(session, task_id):
            stage = session.get(TaskStage, (task_id, Stage.BUILD))
            if stage is not None:
                stage.state, stage.finished_at = StageState.SUCCESS, utcnow()
        session.commit()
