"""Stage 2, build: read ``ci.yaml`` from the checkout and run its script with the executor.

The exit code decides: non-zero, or killed at the timeout, fails the task with
that code (:class:`~cicd.errors.BuildFailed`); the log keeps the output.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cicd import db, lifecycle
from cicd.broker import STAGE_TASKS, app
from cicd.ciyaml import BuildSpec, Pipeline, load_pipeline
from cicd.config import Settings, load_settings
from cicd.errors import BuildCanceled, BuildFailed, LeaseLost
from cicd.languages import LANGUAGES
from cicd.models import Stage, StageState, TaskApproval, TaskStage, utcnow
from cicd.secrets import secret_values
from workers.executors import Executor, Step, get_executor
from workers.logs import LogWriter
from workers.stages import StageTask, is_canceled, task_record, task_workspace

__all__ = ["build", "build_image", "run_build"]


def build_image(spec: BuildSpec, settings: Settings) -> str | None:
    """The image to build in: ci.yaml's, else this agent's or OpsCD's default for the language."""
    if spec.image:
        return spec.image
    defaults = LANGUAGES.get(spec.language or "")
    return settings.language_image(spec.language) or (defaults.image if defaults else None)


def run_build(
    checkout: Path,
    variables: dict[str, str],
    executor: Executor,
    log: LogWriter,
    canceled: Callable[[], bool] = lambda: False,
    node: str | None = None,
    secrets: Callable[[list[str]], dict[str, str]] | None = None,
    withheld: str | None = None,
) -> Pipeline:
    """Read ci.yaml, run its script, raise unless it succeeded; return the pipeline.

    ``secrets`` looks up the secret variables ci.yaml names; by default the
    project's, stored encrypted on the server. ``withheld`` is why this build
    gets none (its ref is not protected), which the log then says.
    """
    settings = load_settings()
    pipeline = load_pipeline(checkout)
    spec = pipeline.build
    timeout = min(spec.timeout or settings.build_timeout, settings.max_build_timeout)
    project = variables.get("CI_PROJECT_PATH", "")
    lookup = secrets or (lambda names: secret_values(project, names, settings.secrets_key))
    secret_env = {}
    if spec.secrets and withheld:
        log.line(f"Secret variables withheld: {', '.join(spec.secrets)} ({withheld})")
    elif spec.secrets:
        secret_env = lookup(spec.secrets)
    log.mask = log.mask.with_secrets(secret_env.values())
    step = Step(
        name=f"{variables.get('CI_TASK_ID', 'local')}-build",
        commands=spec.commands,
        workspace=checkout,
        workdir=spec.workdir,  # where a container sees the checkout; the shell runs in it
        environment={**spec.env, **secret_env, **variables},
        image=build_image(spec, settings),
        timeout=timeout,
        canceled=canceled,
    )
    on = f" on {node}" if node else ""
    log.line(
        f"Running {len(step.commands)} command(s) with {executor.describe(step)}{on}, "
        f"timeout {timeout}s"
    )
    result = executor.run(step, log.write)
    if result.fenced:
        raise LeaseLost("this agent could not reach the database; its build script was stopped")
    if result.canceled:
        raise BuildCanceled("canceled while the build script ran")
    if result.timed_out:
        log.line(f"Build timed out after {timeout}s; its processes were killed")
        raise BuildFailed(result.exit_code, f"build timed out after {timeout}s")
    if not result.ok:
        raise BuildFailed(result.exit_code, f"build script exited with code {result.exit_code}")
    log.line("Build succeeded")
    return pipeline


@app.task(name=STAGE_TASKS["build"], base=StageTask, bind=True, stage=Stage.BUILD)
def build(self: StageTask, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run the build script on this node; pass the parsed pipeline on to publish."""
    node, run = self.request.hostname, int(ctx.get("attempt", 1))
    record = task_record(int(ctx["task_id"]))  # the database's, not the message's
    variables = record.variables
    _, checkout = task_workspace(ctx)
    with self.log_writer(ctx) as log:
        pipeline = run_build(
            checkout,
            variables,
            get_executor(load_settings(), node),
            log,
            canceled=functools.partial(is_canceled, int(ctx["task_id"]), run),
            node=node,
            withheld=record.secrets_withheld,
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
