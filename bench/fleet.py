"""Scenario 6: an agent host killed under a build, on a fleet across hosts (network namespaces).

The fleet is the one ``tests/test_fleet.py`` runs (:mod:`tests.support.fleet`): a
control host (MariaDB, Redis, git over HTTP, the web) and two agent hosts.
Each run pushes a long build, kills every process of the agent host running
its script, and times, from the kill: the reaper's rerun (the build's attempt
moving on, seen through the API) and the rerun's script starting (its first
tick on the other agent's disk). The baseline is the bound the design
promises, ``CICD_AGENT_OFFLINE_AFTER``: the figure is its multiple. The
killed agent is started again before the next run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import spread
from tests.support.fleet import Fleet, Run, start_fleet
from tests.support.git import GitRepo
from tests.support.processes import wait_until

__all__ = ["host_kill"]


def _one_kill(fleet: Fleet, repo: GitRepo, branch: str) -> dict[str, float]:
    task_id = fleet.push(repo, ticks=60, branch=branch)
    victim = fleet.running_on(task_id)
    fleet.agents[victim].kill()
    killed = time.time()
    wait_until(lambda: fleet.task(task_id)["attempt"] > 1, 120, "the rerun")
    requeued = time.time()

    def rerun() -> Run | None:
        return next((run for run in fleet.runs(task_id) if run.agent != victim), None)

    started = wait_until(rerun, 120, "the rerun's script")
    fleet.nodes[victim].stop()
    fleet.start_agent(victim)  # the rerun finishes meanwhile, or with the fleet
    return {"rerun_s": round(requeued - killed, 3), "script_s": round(started.first - killed, 3)}


def host_kill(runs: int, offline_after: float) -> dict[str, Any]:
    """Kill → rerun and kill → rerun's script, ``runs`` times, with the given offline bound."""
    samples = []
    with tempfile.TemporaryDirectory(prefix="opscd-bench-fleet-") as base:
        with start_fleet(Path(base), offline_after=offline_after) as fleet:
            repo = fleet.new_repo()
            for index in range(runs):
                samples.append(_one_kill(fleet, repo, f"kill-{index}"))
    return {
        "offline_after_s": offline_after,
        "runs": samples,
        "summary": {
            "rerun_s": spread([s["rerun_s"] for s in samples]),
            "script_s": spread([s["script_s"] for s in samples]),
            "script_over_bound": spread([s["script_s"] / offline_after for s in samples]),
        },
    }
