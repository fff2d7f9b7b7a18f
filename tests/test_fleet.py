"""A fleet across hosts: a control host and two agent hosts, and the faults a fleet meets.

Hosts are network namespaces on a private /24 (:mod:`support.hosts`); each agent
runs in a mount namespace where the fleet's directory is its own disk, so it
reads nothing of the control host's files. The control host runs a private
MariaDB, a private redis-server, git over HTTP and the web (Procfile); each
agent runs the Procfile's worker with the shell executor and
``CICD_AGENT_OFFLINE_AFTER=10``. Build scripts tick into marker files on
their agent's own disk, so the test counts what really ran, where and when:
a run is the span from its first tick to its last.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from support.fleet import Fleet, Run, start_fleet
from support.git import GitRepo
from support.processes import wait_until

OFFLINE_AFTER = 10


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.fail("the fleet test makes network namespaces: it runs as root (as .ci/run does)")
    with start_fleet(tmp_path_factory.mktemp("fleet"), offline_after=OFFLINE_AFTER) as started:
        yield started


@pytest.fixture
def repo(fleet: Fleet) -> GitRepo:
    return fleet.new_repo()


def max_in_flight(runs: list[Run]) -> int:
    """The most runs executing at one moment."""
    edges = sorted([(run.first, 1) for run in runs] + [(run.last, -1) for run in runs])
    most = current = 0
    for _, change in edges:
        current += change
        most = max(most, current)
    return most


def other(fleet: Fleet, agent: str) -> str:
    return next(name for name in fleet.agents if name != agent)


def test_builds_spread_over_both_agents_within_their_slots_and_every_log_reads_on_control(
    fleet: Fleet, repo: GitRepo
):
    ids = [fleet.push(repo, ticks=8, branch=f"spread-{i}") for i in range(8)]
    for task_id in ids:
        done = fleet.wait_done(task_id)
        assert done["state"] == "success", fleet.log(task_id)
        assert f"\ndone {task_id}\n" in fleet.log(task_id)  # stored by an agent, read here
    runs = {task_id: fleet.runs(task_id) for task_id in ids}
    assert all(len(found) == 1 for found in runs.values()), runs
    by_agent = {name: [r for found in runs.values() for r in found if r.agent == name]
                for name in fleet.agents}  # fmt: skip
    assert all(by_agent.values()), f"one agent ran nothing: {by_agent}"
    for name, agent_runs in by_agent.items():
        assert max_in_flight(agent_runs) <= 3, f"{name} ran more than its 3 slots at once"


def test_a_partitioned_agents_build_runs_once_at_a_time_and_ends_as_the_reruns(
    fleet: Fleet, repo: GitRepo
):
    task_id = fleet.push(repo, ticks=40)  # 20 s: longer than the agent's lease (8 s)
    cut = fleet.running_on(task_id)
    host = fleet.agents[cut]
    time.sleep(1)
    host.cut(fleet.control)
    try:
        time.sleep(OFFLINE_AFTER + 6)  # the agent is taken for offline, its build run again
    finally:
        host.heal()
    done = fleet.wait_done(task_id)
    current = fleet.log(task_id)
    assert done["state"] == "success" and done["attempt"] == 2, current
    assert done["worker"].startswith(other(fleet, cut) + "@")
    runs = fleet.runs(task_id)
    assert [run.agent for run in runs] == [cut, other(fleet, cut)], runs
    first, rerun = runs
    assert first.last < rerun.first, "two runs of the build executed at the same time"
    assert len(first.ticks) < 40, "the partitioned run was not stopped"
    assert current.count("Build succeeded") == 1 and current.count(f"\ndone {task_id}\n") == 1
    assert "stopped responding" in current
    wait_until(lambda: "run 1 was superseded by run 2" in fleet.log(task_id, attempt=1), 90,
               "the partitioned run to say it was replaced")  # fmt: skip
    fleet.wait_online(cut, timeout=90)
    later = [fleet.push(repo, ticks=4, branch=f"after-cut-{i}") for i in range(6)]
    for later_id in later:
        assert fleet.wait_done(later_id)["state"] == "success", fleet.log(later_id)
    assert any(run.agent == cut for i in later for run in fleet.runs(i)), "healed agent idle"


def test_an_agent_cut_from_the_broker_only_keeps_its_build_and_takes_work_when_it_is_back(
    fleet: Fleet, repo: GitRepo
):
    task_id = fleet.push(repo, ticks=16)
    cut = fleet.running_on(task_id)
    host, node = fleet.agents[cut], fleet.nodes[cut]
    broker_port = int(fleet.env[cut]["CICD_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])
    host.cut(fleet.control, port=broker_port)
    cut_at = time.monotonic()
    try:
        # Builds pushed meanwhile fill the other agent's 3 slots: this one takes none. (The
        # first may be popped by this agent's dead connection: the reaper sends it again.)
        busy = [fleet.push(repo, ticks=60, branch=f"busy-{i}") for i in range(3)]
        wait_until(lambda: all(fleet.task(i)["worker"] for i in busy), 40, "the busy builds")
        assert {fleet.task(i)["worker"].split("@")[0] for i in busy} == {other(fleet, cut)}
        time.sleep(max(0.0, cut_at + OFFLINE_AFTER + 2 - time.monotonic()))
        row = fleet.agent_rows()[cut]
        assert row["online"], row  # its heartbeats reach the database
        assert row["broker_unreachable_since"], row
        assert "broker unreachable since" in fleet.get("/agents").text
        waiting = fleet.push(repo, ticks=2, branch="after-broker-cut")  # only this agent has room
    finally:
        host.heal()
        healed = time.monotonic()
    wait_until(lambda: fleet.task(waiting)["worker"], 30, "the waiting build to be taken")
    taken = time.monotonic() - healed
    assert fleet.task(waiting)["worker"].startswith(cut + "@")
    assert taken <= 5, f"the agent took a build {taken:.1f}s after the broker came back"
    done = fleet.wait_done(task_id)
    current = fleet.log(task_id)
    assert done["state"] == "success" and done["attempt"] == 1, current
    assert len(fleet.runs(task_id)) == 1 and "running it again" not in current
    assert "broker unreachable since" in node.output()
    wait_until(lambda: not fleet.agent_rows()[cut]["broker_unreachable_since"], 30,
               "the agents page to drop the broker note")  # fmt: skip
    for other_id in [*busy, waiting]:
        assert fleet.wait_done(other_id)["state"] == "success", fleet.log(other_id)


def test_a_killed_agent_hosts_build_runs_again_on_the_other_agent(fleet: Fleet, repo: GitRepo):
    task_id = fleet.push(repo, ticks=30)
    killed = fleet.running_on(task_id)
    time.sleep(1)
    fleet.agents[killed].kill()
    at = time.time()
    done = fleet.wait_done(task_id)
    current = fleet.log(task_id)
    assert done["state"] == "success" and done["attempt"] == 2, current
    assert done["worker"].startswith(other(fleet, killed) + "@")
    runs = fleet.runs(task_id)
    assert [run.agent for run in runs] == [killed, other(fleet, killed)]
    assert runs[0].last <= at < runs[1].first
    print(f"host killed -> rerun's script: {runs[1].first - at:.1f}s")
