"""Run a build's steps: in file order, or as the graph their ``depends_on`` make, with up to
``CICD_STEP_CONCURRENCY`` at once, each recorded in ``task_steps`` and logged in a section of
its own.

A step starts once every step it waits for has ended (succeeded, failed or was
skipped); its ``when`` then decides whether it runs, on the build's event, ref, changed
files and whether a step has failed so far. A failed step fails the build with its exit
code, unless it says ``failure: ignore``; the steps not started yet are then skipped
(but for those that run after a failure, ``when: {status: failure}``), and steps already
running go on to their end. All steps share the build's slot on the node and the build's
time limit (``CICD_MAX_BUILD_TIMEOUT``, so the stage never outlives the broker's
visibility timeout), and a cancel stops them all.

Steps run on threads of the stage: each runs one executor step (a process group or a
container) and waits for it, so threads are what they cost here.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import delete, select, update

from cicd import db, statuses
from cicd.ciyaml import Pipeline, StepContext, StepSpec
from cicd.config import Settings
from cicd.errors import BuildCanceled, BuildFailed, LeaseLost, OpsCDError
from cicd.languages import LANGUAGES
from cicd.models import Stage, StepState, TaskStatus, TaskStep, utcnow
from workers.executors import Executor, Services, Step
from workers.logs import LogWriter, task_log_store

__all__ = ["StepRecords", "TaskStepRecords", "BuildRun", "run_steps", "step_image"]

log = logging.getLogger(__name__)

FINISHED = (StepState.SUCCESS, StepState.FAILED, StepState.SKIPPED, StepState.CANCELED)


def step_image(spec: StepSpec, settings: Settings) -> str | None:
    """The image a step runs in: its own, else this agent's or OpsCD's default for its
    language."""
    if spec.image:
        return spec.image
    defaults = LANGUAGES.get(spec.language or "")
    return settings.language_image(spec.language) or (defaults.image if defaults else None)


class StepRecords:
    """Where a run's step states go: nowhere here (``cicd run`` prints them); the database
    for real builds (:class:`TaskStepRecords`)."""

    def begin(self, steps: tuple[StepSpec, ...]) -> None:
        """Every step of the run, ``queued``, in file order."""

    def start(self, name: str, image: str | None, node: str | None) -> None:
        """The step runs now."""

    def finish(self, name: str, state: StepState, exit_code: int | None = None,
               reason: str | None = None) -> None:  # fmt: skip
        """The step ended (or was skipped or canceled before it ran)."""

    def combination(self, label: str, state: str, description: str) -> None:
        """A matrix combination runs (``running``) or ended (``success``, ``failed``)."""


class TaskStepRecords(StepRecords):
    """``task_steps`` rows of one run of a build. Fenced by the run: rows are replaced only
    while ``attempt`` is the task's current one, and a run that was given up for dead
    changes nothing of the run that replaced it."""

    def __init__(self, task_id: int, attempt: int) -> None:
        self.task_id, self.attempt = task_id, attempt

    def begin(self, steps: tuple[StepSpec, ...]) -> None:
        def write() -> None:
            with db.session() as session:
                current = session.scalar(
                    select(TaskStatus.attempt)
                    .where(TaskStatus.task_id == self.task_id)
                    .with_for_update()
                )
                if current != self.attempt:
                    return
                session.execute(delete(TaskStep).where(TaskStep.task_id == self.task_id))
                for position, spec in enumerate(steps):
                    session.add(TaskStep(task_id=self.task_id, name=spec.name, position=position,
                                         attempt=self.attempt, state=StepState.QUEUED))  # fmt: skip
                session.commit()

        db.retrying(write, f"task {self.task_id}: recording its steps")

    def start(self, name: str, image: str | None, node: str | None) -> None:
        self._set(name, state=StepState.RUNNING, image=image, node=node, started_at=utcnow())

    def finish(self, name: str, state: StepState, exit_code: int | None = None,
               reason: str | None = None) -> None:  # fmt: skip
        self._set(name, state=state, exit_code=exit_code, reason=reason, finished_at=utcnow())

    def combination(self, label: str, state: str, description: str) -> None:
        """Each matrix combination has its own commit status (if the project reports them),
        recorded while this run is the current one."""

        def write() -> None:
            with db.session() as session:
                current = session.scalar(
                    select(TaskStatus.attempt).where(TaskStatus.task_id == self.task_id)
                )
                if current == self.attempt:
                    statuses.report(session, self.task_id, statuses.matrix_unit(label), state,
                                    description)  # fmt: skip
                    session.commit()

        try:
            db.retrying(write, f"task {self.task_id}: recording combination {label}")
        except Exception:  # a status never changes the build
            log.exception("task %s: status of combination %s not recorded", self.task_id, label)

    def _set(self, name: str, **values: object) -> None:
        def write() -> None:
            with db.session() as session:
                session.execute(
                    update(TaskStep)
                    .where(
                        TaskStep.task_id == self.task_id,
                        TaskStep.name == name,
                        TaskStep.attempt == self.attempt,
                    )
                    .values(**values)
                )
                session.commit()

        try:
            db.retrying(write, f"task {self.task_id}: recording step {name}")
        except Exception:  # the build goes on; its result still reaches task_states
            log.exception("task %s: step %s not recorded as %s", self.task_id, name, values)


@dataclass(frozen=True)
class BuildRun:
    """What the steps of one build run with; all of it from the database and this agent's
    settings, nothing from a broker message."""

    checkout: Path
    variables: dict[str, str]
    executor: Executor
    settings: Settings
    log: LogWriter
    #: Each step's own log section: a writer for the step's name.
    step_log: Callable[[str], LogWriter]
    context: StepContext
    records: StepRecords = field(default_factory=StepRecords)
    canceled: Callable[[], bool] = lambda: False
    node: str | None = None
    #: The secret variables of every step, looked up once (empty when withheld).
    secret_values: dict[str, str] = field(default_factory=dict)
    #: A retry from the failed step: the steps not run again, with the reason shown.
    reused: dict[str, str] = field(default_factory=dict)
    #: The build's running services, which every step joins.
    services: Services | None = None
    #: A ``build:`` file's one step: its errors read as they did before steps existed.
    shorthand: bool = False
    #: Variables that point a language default's tool at the cached directories
    #: (``MAVEN_OPTS``); a step's own environment overrides them.
    tool_environment: dict[str, str] = field(default_factory=dict)


@dataclass
class _Failure:
    step: str
    error: Exception


def run_steps(pipeline: Pipeline, run: BuildRun) -> None:
    """Run every step as the pipeline orders them; raise :class:`BuildFailed` (or the
    executor's error) for the first step that failed the build, :class:`BuildCanceled`
    or :class:`LeaseLost` when the build was stopped."""
    steps = {spec.name: spec for spec in pipeline.steps_to_run}
    waits_for = pipeline.dependencies
    # With a matrix each combination is a build of its own: a failure skips only its steps.
    combination_of = {name: pipeline.combination_of(name) for name in steps}
    failed_in: set[str | None] = set()
    reported: set[str] = set()
    pending = list(steps)  # file order: of the ready steps, the first written starts first
    states: dict[str, StepState] = {}
    failure: _Failure | None = None
    stopped: Exception | None = None
    deadline = time.monotonic() + run.settings.max_build_timeout
    run.records.begin(tuple(steps.values()))
    limit = max(1, run.settings.step_concurrency)
    with concurrent.futures.ThreadPoolExecutor(limit, thread_name_prefix="opscd-step") as pool:
        running: dict[concurrent.futures.Future, str] = {}
        while pending or running:
            started_any = True
            while started_any and stopped is None and len(running) < limit:
                started_any = False
                for name in list(pending):
                    if len(running) >= limit:
                        break
                    if any(states.get(dep) not in FINISHED for dep in waits_for[name]):
                        continue
                    pending.remove(name)
                    combination = combination_of[name]
                    failed = combination in failed_in if pipeline.matrix else failure is not None
                    context = replace(run.context, failed=failed)
                    reason = run.reused.get(name) or steps[name].skip_reason(context)
                    if reason is not None:
                        states[name] = StepState.SKIPPED
                        run.records.finish(name, StepState.SKIPPED, reason=reason)
                        run.log.line(f"Step {name} skipped: {reason}")
                        _combination_done(combination_of, name, states, failed_in, run.records)
                        started_any = True
                        continue
                    states[name] = StepState.RUNNING
                    if combination is not None and combination not in reported:
                        reported.add(combination)
                        run.records.combination(combination, "running", "running")
                    image = step_image(steps[name], run.settings)
                    run.records.start(name, image, run.node)
                    remaining = deadline - time.monotonic()
                    future = pool.submit(_run_one, steps[name], image, run, remaining)
                    running[future] = name
                    started_any = True
            if not running:
                break  # everything left waits for a step that will not run: canceled below
            done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
            for future in done:
                name = running.pop(future)
                try:
                    state, exit_code, reason, error = future.result()
                except Exception as unexpected:  # e.g. the engine's API broke: the step failed
                    log.exception("step %s could not run", name)
                    state, exit_code, error = StepState.FAILED, None, unexpected
                    reason = f"could not run: {type(unexpected).__name__}: {unexpected}"[:500]
                states[name] = state
                run.records.finish(name, state, exit_code, reason)
                if isinstance(error, BuildCanceled | LeaseLost):
                    stopped = stopped or error
                elif error is not None:
                    failed_in.add(combination_of[name])
                    failure = failure or _Failure(name, error)
                    if combination_of[name] is not None and stopped is None:
                        run.records.combination(combination_of[name], "failed",
                                                f"failed at step {name}")  # fmt: skip
                _combination_done(combination_of, name, states, failed_in, run.records)
            if stopped is not None:
                pending.clear()  # running steps see the cancel (or the lease) themselves
    for name in steps:
        if states.get(name) not in FINISHED:
            run.records.finish(name, StepState.CANCELED, reason="the build was stopped")
    if stopped is not None:
        raise stopped
    if failure is not None:
        raise failure.error
    run.log.line("All steps succeeded" if len(steps) > 1 else "Build succeeded")


def _combination_done(
    combination_of: dict[str, str | None], name: str, states: dict[str, StepState],
    failed_in: set[str | None], records: StepRecords,
) -> None:  # fmt: skip
    """Once every step of a matrix combination ended, its status is ``success`` (a failure
    was recorded when it happened)."""
    combination = combination_of[name]
    if combination is None or combination in failed_in:
        return
    own = [step for step, other in combination_of.items() if other == combination]
    if all(states.get(step) in FINISHED for step in own):
        records.combination(combination, "success", "built")


def _run_one(
    spec: StepSpec, image: str | None, run: BuildRun, remaining: float
) -> tuple[StepState, int | None, str | None, Exception | None]:
    """Run one step to its end: (state, exit code, reason, the error that fails the build)."""
    timeout = max(1, int(min(spec.timeout or run.settings.build_timeout, remaining)))
    environment = {**run.tool_environment, **spec.environment,
                   **{n: run.secret_values[n] for n in spec.secrets if n in run.secret_values},
                   **run.variables}  # fmt: skip
    step = Step(
        name=f"{run.variables.get('CI_TASK_ID', 'local')}-{spec.name}",
        commands=spec.commands_to_run,
        workspace=run.checkout,
        workdir=spec.workdir,  # where a container sees the checkout; the shell runs in it
        environment=environment,
        image=image,
        timeout=timeout,
        canceled=run.canceled,
        directory=spec.directory,
        services=run.services,
    )
    with _step_log(run, spec.name) as log:
        on = f" on {run.node}" if run.node else ""
        log.line(f"── step {spec.name}: {len(step.commands)} command(s) with "
                 f"{run.executor.describe(step)}{on}, timeout {timeout}s")  # fmt: skip
        try:
            result = run.executor.run(step, log.write)
        except OpsCDError as error:  # e.g. no image to run it in: the step's failure
            log.line(f"Step {spec.name} could not run: {error}")
            return _failed(spec, None, str(error), error)
        if result.fenced:
            return (
                StepState.CANCELED,
                None,
                "this agent lost the database",
                LeaseLost("this agent could not reach the database; its build was stopped"),
            )
        if result.canceled:
            return (
                StepState.CANCELED,
                None,
                "canceled",
                BuildCanceled(f"canceled while step {spec.name} ran"),
            )
        if result.timed_out:
            log.line(f"Step {spec.name} timed out after {timeout}s; its processes were killed")
            # (a build: file's one step says it as before steps existed)
            why = f"{'build' if run.shorthand else f'step {spec.name}'} timed out after {timeout}s"
            return _failed(spec, result.exit_code, why, BuildFailed(result.exit_code, why))
        if not result.ok:
            log.line(f"Step {spec.name} failed with exit code {result.exit_code}")
            script = "build script" if run.shorthand else f"step {spec.name}"
            why = f"{script} exited with code {result.exit_code}"
            return _failed(spec, result.exit_code, why, BuildFailed(result.exit_code, why))
        log.line(f"Step {spec.name} succeeded")
        return StepState.SUCCESS, 0, None, None


def _failed(
    spec: StepSpec, exit_code: int | None, why: str, error: Exception
) -> tuple[StepState, int | None, str | None, Exception | None]:
    if spec.failure == "ignore":
        return StepState.FAILED, exit_code, f"{why}; ignored (failure: ignore)", None
    return StepState.FAILED, exit_code, why, error


@contextmanager
def _step_log(run: BuildRun, name: str) -> Iterator[LogWriter]:
    writer = run.step_log(name)
    try:
        yield writer
    finally:
        writer.close()


def database_step_log(
    task_id: int, attempt: int, stage_log: LogWriter
) -> Callable[[str], LogWriter]:
    """Writers of steps' sections of a build's log in ``task_logs``: masked as the stage's
    writer is when the step starts (its secrets included), sharing the run's room."""

    def writer(name: str) -> LogWriter:
        return LogWriter(task_log_store(task_id, Stage.BUILD, attempt, step=name),
                         stage_log.mask, max_bytes=stage_log.budget,
                         follows=stage_log)  # fmt: skip

    return writer
