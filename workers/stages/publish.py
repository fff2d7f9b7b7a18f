"""Stage 3, publish: build the image ``ci.yaml`` asks for, push it, then remove the workspace.

A ``ci.yaml`` without a ``publish`` section builds no image: the stage is
recorded as skipped. Otherwise the image is built from the repository's
Dockerfile (the build stage's outputs, such as ``target/*.jar``, are in the
context), tagged ``<CICD_REGISTRY>/<project>:<branch>..<short sha>`` (tag
pushes: ``:<tag>``; see :func:`~workers.registry.image_reference`), pushed,
and its local copy removed. The publish section is read from the checkout's
``ci.yaml`` again: a broker message decides nothing here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cicd import db, statuses
from cicd.broker import STAGE_TASKS, app
from cicd.ciyaml import PublishSpec, load_pipeline
from cicd.config import load_settings
from cicd.errors import BuildCanceled, LeaseLost, StageError
from cicd.models import Stage
from workers import lease
from workers.engine import docker_client
from workers.logs import LogWriter
from workers.registry import (
    build_image,
    existing_image,
    image_reference,
    push_image,
    remove_image,
)
from workers.stages import StageTask, is_canceled, task_record, task_workspace
from workers.workspace import remove_workspace

__all__ = ["publish", "run_publish"]


def run_publish(
    spec: PublishSpec, checkout: Path, variables: dict[str, str], log: LogWriter,
    canceled: Callable[[], bool] = lambda: False, protected: bool = False,
) -> tuple[str, str | None]:  # fmt: skip
    """Build the image from the Dockerfile, push it; return its name and digest.

    ``canceled`` is asked between the image build and the push: a canceled
    build, or a run another run replaced, pushes nothing. An image tag the
    registry has already, as another image, is replaced only by a build of a
    protected ref, or of the commit a branch image's tag names (its rebuild).
    """
    settings = load_settings()
    if not settings.registry:
        raise StageError(
            "image push",
            "ci.yaml asks for an image, but this agent has no registry to push to",
            "set CICD_REGISTRY (and its credentials) on the agent, or remove publish",
        )
    ref_type = "tag" if "CI_COMMIT_TAG" in variables else "branch"
    repository, tag = image_reference(
        settings.registry,
        variables["CI_PROJECT_PATH"],
        ref_type,
        variables["CI_COMMIT_REF_NAME"],
        variables["CI_COMMIT_SHA"],
    )
    reference = f"{repository}:{tag}"
    labels = {
        "org.opencontainers.image.revision": variables["CI_COMMIT_SHA"],
        "org.opencontainers.image.ref.name": variables["CI_COMMIT_REF_NAME"],
        "dev.opscd.task": variables.get("CI_TASK_ID", "local"),
    }
    client = docker_client(settings)
    try:
        build_image(client, checkout, spec, reference, labels, settings, log.write)
        if not protected and ref_type == "tag":
            _refuse_overwrite(client, repository, tag, reference, settings)
        if lease.expired():
            raise LeaseLost("this agent could not reach the database; it pushed no image")
        if canceled():
            raise BuildCanceled("canceled before the image was pushed")
        digest = push_image(client, repository, tag, settings, log.write)
    finally:
        remove_image(client, reference)
        client.close()
    log.line(f"Pushed {reference}" + (f" ({digest})" if digest else ""))
    return reference, digest


def _refuse_overwrite(client, repository: str, tag: str, reference: str, settings) -> None:
    """A build of an unprotected tag does not replace an image people may deploy."""
    there = existing_image(repository, tag, settings)
    if there is None or there == client.images.get(reference).id:
        return
    raise StageError(
        "image push",
        f"{repository}:{tag} exists already as another image ({there[:19]}); only a build of a "
        "protected ref may replace it",
        "protect the tag (cicd projects set PROJECT --protected 'main,refs/tags/v*') or push "
        "a new tag",
    )


@app.task(name=STAGE_TASKS["publish"], base=StageTask, bind=True, stage=Stage.PUBLISH)
def publish(self: StageTask, ctx: dict[str, Any]) -> dict[str, Any]:
    """Publish the image, or record that none was asked for; the build ends here."""
    workspace, checkout = task_workspace(ctx)
    with self.log_writer(ctx) as log:
        spec = load_pipeline(checkout).publish  # the checkout's ci.yaml, not the message's
        record = task_record(int(ctx["task_id"]))  # the database's, not the message's
        skipped = "ci.yaml has no publish section" if spec is None else record.no_publish
        if skipped:
            log.line(f"Publish skipped: {skipped}")
            remove_workspace(workspace)
            return {**ctx, "skipped": Stage.PUBLISH.value}
        with db.session() as session:
            statuses.publishing(session, int(ctx["task_id"]))
            session.commit()
        canceled = functools.partial(is_canceled, int(ctx["task_id"]), int(ctx.get("attempt", 1)))
        reference, digest = run_publish(
            spec, checkout, record.variables, log, canceled, protected=record.protected
        )
    remove_workspace(workspace)
    return {**ctx, "image": reference, "image_digest": digest}
