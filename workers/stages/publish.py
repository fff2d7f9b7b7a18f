"""Stage 3, publish: build and push the image ``ci.yaml`` asks for, then remove the workspace.

A ``ci.yaml`` without a ``publish`` section builds no image: the stage is
recorded as skipped. Image build and push run on a container engine, which
arrives with the docker executor; until then a publish request fails clearly.
"""

from __future__ import annotations

from typing import Any

from cicd.errors import StageError
from cicd.models import Stage
from workers.celery_app import STAGE_TASKS, app
from workers.stages import StageTask
from workers.workspace import remove_workspace

__all__ = ["publish"]


@app.task(name=STAGE_TASKS["publish"], base=StageTask, bind=True, stage=Stage.PUBLISH)
def publish(self: StageTask, ctx: dict[str, Any]) -> dict[str, Any]:
    """Publish the image, or record that none was asked for; the build ends here."""
    with self.log_writer(ctx) as log:
        if not ctx.get("pipeline", {}).get("publish"):
            log.line("Publish skipped: ci.yaml has no publish section")
            remove_workspace(ctx.get("workspace"))
            return {**ctx, "skipped": Stage.PUBLISH.value}
    raise StageError(
        "image build",
        "ci.yaml asks for an image, but this agent has no container engine configured",
        "run the agent with CICD_EXECUTOR=docker, or remove the publish section",
    )
