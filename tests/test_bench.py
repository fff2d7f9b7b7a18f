"""The benchmark command runs every scenario and writes its results: ``python -m bench --smoke``.

Against the MariaDB and Redis the test suite uses, in a database and a Redis
database of its own; the results go to a temporary file, so the committed
``bench/results.json`` stays as it is. No timing is asserted: this checks
that the bench works, not how fast OpsCD is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "webhook", "dispatch", "pipelines", "heartbeats", "host_kill", "maven_cache", "history",
    "node_kill", "brokers", "memory",
}  # fmt: skip
BENCH_REDIS_DB = "11"  # the tests use 13 to 15; a full bench run uses 12


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    output, doc = out / "results.json", out / "benchmarks.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CICD_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--redis-db", BENCH_REDIS_DB,
         "--output", str(output), "--doc", str(doc)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(output.read_text()), doc.read_text(), done


@pytest.mark.timeout(650)
def test_smoke_run_writes_every_scenario(smoke) -> None:
    results, doc, _ = smoke
    assert set(results["scenarios"]) == SCENARIOS
    assert results["meta"]["mode"] == "smoke"
    for key in ("cpu_model", "cores", "memory_gib"):
        assert results["machine"][key]
    for package in ("python", "celery", "kombu", "redis_server", "mariadb", "flask", "gunicorn"):
        assert results["versions"][package]
    assert {t["target"].split(" ")[0] for t in results["targets"]} == {
        "webhook", "dispatch", "builds/s", "OpsCD's", "worker", "maven", "history:", "200",
        "RabbitMQ:",
    }  # fmt: skip
    targets = {t["target"] for t in results["targets"]}
    assert "webhook requests/s ≥ 0.7x the durable baseline (INSERT + RPUSH)" in targets
    assert "webhook gunicorn CPU per delivery ≤ 1.5 ms" in targets
    for title in ("Webhook throughput", "Dispatch latency", "Pipeline throughput", "heartbeating",
                  "Memory", "Machine and versions", "agent host killed", "durable Flask",
                  "Dependency cache", "Warm checkouts", "The broker: Redis and RabbitMQ",
                  "PostgreSQL"):  # fmt: skip
        assert title in doc


@pytest.mark.timeout(650)
def test_smoke_run_measured_the_real_path(smoke) -> None:
    """Each scenario did what it says: requests answered, builds succeeded, rows written."""
    results, _, _ = smoke
    scenarios = results["scenarios"]
    webhook = scenarios["webhook"]["runs"]
    for system in ("opscd", "baseline", "durable"):
        (run,) = webhook[system]
        assert run["requests"] > 0
        assert sum(run["errors"].values()) == 0, run["errors"]
        assert run["queued_in_broker"] >= run["requests"]
    for system in ("opscd", "durable"):  # each delivery committed before it was answered
        assert webhook[system][0]["rows_committed"] >= webhook[system][0]["requests"]
    assert scenarios["webhook"]["ratio_rps_durable"]["runs"] == 1

    pooled = scenarios["dispatch"]["pooled"]
    assert pooled["first_stage"]["n"] == pooled["script"]["n"] > 0
    assert pooled["celery"]["n"] > 0

    for nodes, result in scenarios["pipelines"]["by_nodes"].items():
        for run in result["runs"]["opscd"]:
            assert sum(run["builds_per_node"].values()) == run["count"], nodes
    assert set(scenarios["pipelines"]["by_nodes"]) == {"1", "2"}

    heartbeats = scenarios["heartbeats"]
    assert heartbeats["agent_rows"] == heartbeats["agents"] == 200
    assert heartbeats["postgresql"]["agent_rows"] == 200, heartbeats["postgresql"]
    for database in (heartbeats, heartbeats["postgresql"]):
        assert all(run["errors"] == 0 and run["writes_per_second"] > 0 for run in
                   database["runs"]), database  # fmt: skip

    # A killed node's build ran again on the other node, on each broker; RabbitMQ's run
    # had its own dispatch and builds.
    rabbit = scenarios["brokers"]["scenarios"]
    assert scenarios["node_kill"]["broker"] == "redis"
    assert rabbit["node_kill"]["broker"] == "rabbitmq"
    for kill in (scenarios["node_kill"], rabbit["node_kill"]):
        assert len(kill["runs"]) == 1 and kill["runs"][0] > 0, kill
    assert rabbit["dispatch"]["pooled"]["first_stage"]["n"] > 0
    assert scenarios["brokers"]["meta"]["broker_url"].startswith("amqp://")

    # The rerun started, and not before the bound counted from the victim's last heartbeat
    # (at most one heartbeat interval, a fifth of the bound, before the kill).
    kill = scenarios["host_kill"]
    earliest = kill["offline_after_s"] * 4 / 5
    assert kill["runs"] and all(s["script_s"] > earliest for s in kill["runs"]), kill

    # Maven: 30+ dependencies resolved over HTTP by the cold build; the warm one restored
    # the cache the cold one saved. Every build succeeded (the bench raises otherwise).
    maven = scenarios["maven_cache"]
    assert maven["dependencies"] >= 30
    assert set(maven["variants"]) == {"cache_section", "java_default"}
    for variant, result in maven["variants"].items():
        (run,) = result["runs"]
        assert run["cold"]["state"] == run["warm"]["state"] == "success", variant
        assert run["cold"]["served"]["declared_jars"] == maven["dependencies"], run["cold"]
        assert run["cold"]["served"]["jar"] >= 30, run["cold"]["served"]
        assert run["cold"]["served"]["requests"] > 0
        assert any(line.startswith("Cache restored") for line in run["warm"]["cache_log"]), run

    # History: both builds copied their history from the agent's mirror, which the git
    # server filled (cold) and brought up to date (warm).
    history = scenarios["history"]
    assert history["commits"] == 200 and history["pack_bytes"] > 2_000_000
    (run,) = history["runs"]
    for when in ("cold", "warm"):
        assert run[when]["state"] == "success"
        assert run[when]["from_mirror"], run[when]
        assert run[when]["bytes_served"] > 0

    memory = scenarios["memory"]
    for key in ("web_opscd", "web_baseline", "web_durable", "worker_opscd", "worker_noop"):
        assert memory[key]["load_rss_mib"] > 0
        assert memory[key]["load_pss_mib"] > 0


def test_smoke_run_cleans_up(smoke) -> None:
    """Its database is dropped and nothing it started is left running."""
    import psutil
    import pymysql

    results, _, _ = smoke
    connection = pymysql.connect(
        host=os.environ.get("OPSCD_TEST_MYSQL_HOST", "127.0.0.1"),
        port=int(os.environ.get("OPSCD_TEST_MYSQL_PORT", "3306")),
        user=os.environ.get("OPSCD_TEST_MYSQL_USER", "root"),
        password=os.environ.get("OPSCD_TEST_MYSQL_PASSWORD", ""),
    )
    with connection, connection.cursor() as cursor:
        cursor.execute("SHOW DATABASES LIKE %s", (results["meta"]["database"],))
        assert cursor.fetchall() == ()
    leftovers = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get("BENCH_REDIS_URL") == results["meta"]["redis_url"]:
                leftovers.append(process.info)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    assert leftovers == []
