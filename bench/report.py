"""``docs/benchmarks.md`` from the results: machine, versions and one table per scenario.

Every figure is the median over the runs with its min-max beside it.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["render"]

CPU_PARTS = {
    "workers": "worker node (with its git and sh)",
    "mariadb": "MariaDB",
    "redis": "Redis",
    "bench": "bench process (enqueue + git server)",
}


def _fig(spread: dict[str, Any], unit: str = "", digits: int = 1, scale: float = 1) -> str:
    """``median (min-max)`` of one figure over the runs; the median alone after one run."""
    median, low, high = (f"{spread[key] * scale:,.{digits}f}" for key in ("median", "min", "max"))
    if spread.get("runs", 1) == 1:
        return f"{median}{unit}"
    return f"{median}{unit} ({low}-{high})"


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _webhook(data: dict[str, Any]) -> str:
    summary, runs = data["summary"], data["runs"]
    labels = {
        "opscd": "OpsCD `POST /webhooks/gitlab`",
        "baseline": "bare Flask: parse JSON, one RPUSH",
        "durable": "durable Flask: parse JSON, one INSERT committed, one RPUSH",
    }
    labels = {name: label for name, label in labels.items() if name in runs}
    rows = [
        [label, _fig(summary[name]["rps"]), _fig(summary[name]["p50_ms"], " ms"),
         _fig(summary[name]["p99_ms"], " ms"),
         _fig(summary[name]["client_cpu_share"], " %", 0, scale=100)]
        for name, label in labels.items()
    ]  # fmt: skip
    table = _table(["endpoint", "requests/s", "p50", "p99", "wrk's share of the 2 cores"], rows)
    cpu_rows = [
        [label]
        + [f"{_median([r['cpu_ms_per_request'][part] for r in runs[name]]):.2f}"
           for part in ("server", "mariadb", "redis")]
        + [f"{_median([r['mariadb_connections_per_request'] for r in runs[name]]):.3f}"]
        for name, label in labels.items()
    ]  # fmt: skip
    cpu_table = _table(
        ["CPU ms per request (median)", "gunicorn tree", "MariaDB", "Redis",
         "MariaDB connections opened per request"],
        cpu_rows,
    )  # fmt: skip
    rows_ok = all(
        r["rows_committed"] >= r["requests"]
        for name in ("opscd", "durable")
        for r in runs.get(name, [])
    )
    errors = sum(sum(r["errors"].values()) for system in runs.values() for r in system)
    durable = (
        f", OpsCD / durable baseline: **{_fig(data['ratio_rps_durable'], ' x', 2)}**"
        if "ratio_rps_durable" in data
        else ""
    )
    return (
        f"{table}\n\nRatio OpsCD / bare baseline (requests/s, run by run): "
        f"**{_fig(data['ratio_rps'], ' x', 2)}**{durable}. The durable baseline keeps each "
        "delivery as OpsCD does before it answers: one row (`bench_deliveries`, in the bench's "
        "database) committed over a PyMySQL connection of its serving thread, then the RPUSH. "
        f"Load: `{data['load']}` and "
        "`Connection: close` (a new connection per delivery, as GitLab sends them); "
        "gunicorn as in the Procfile (2 gthread workers, 8 threads each). No worker "
        "consumed: the queue was purged after each run. Every OpsCD and durable baseline "
        f"request committed its rows ({'yes' if rows_ok else 'NO'}) and queued its work; "
        "errors (socket or "
        f"non-2xx): {errors}.\n\n{cpu_table}\n"
    )


def _dispatch(data: dict[str, Any]) -> str:
    summary, pooled = data["summary"], data["pooled"]
    labels = {
        "enqueued": "chain sent to Redis (`task_states.enqueued_at`)",
        "first_stage": "first stage (clone) starts on a worker",
        "response": "webhook answered (202)",
        "build_stage": "build stage starts (clone done)",
        "script": "build script runs (`date +%s.%N` in its log)",
        "celery": "Celery alone: no-op task, publish → start",
    }
    rows = [
        [label, _fig(summary[key]["p50_ms"], " ms"), _fig(summary[key]["p95_ms"], " ms"),
         _fig(summary[key]["p99_ms"], " ms"), f"{pooled[key]['p99_ms']:.1f} ms",
         str(pooled[key]["n"])]
        for key, label in labels.items()
    ]  # fmt: skip
    table = _table(
        ["from sending the push webhook to …", "p50", "p95", "p99", "p99 of all samples",
         "samples"],
        rows,
    )  # fmt: skip
    return (
        f"{table}\n\nPaced: {data['pacing']}; one worker node (`-c 3`), idle when each push "
        "arrives. p50/p95/p99 per run, median and min-max over the runs. Times are "
        "the client's clock before sending against the worker's (`task_stages.started_at`) "
        "and the script's own, all on this machine. For comparison, a polling design "
        "waits half its interval on average before a build even starts: OpsGoCD polled "
        "every 5 s (≈ 2.5 s), GitLab runners poll every 3 s (≈ 1.5 s).\n"
    )


def _pipelines(data: dict[str, Any]) -> str:
    rows = []
    for nodes, result in data["by_nodes"].items():
        summary = result["summary"]
        same = "same_work_chain" in summary
        cpu = _median([sum(run["cpu_ms_per_build"].values()) for run in result["runs"]["opscd"]])
        rows.append(
            [nodes, _fig(summary["opscd"]), f"{cpu:.0f} ms", _fig(summary["raw_chain"], "", 0),
             _fig(result["ratio_to_raw_chain"], " x", 3),
             _fig(summary["same_work_chain"]) if same else "-",
             _fig(result["ratio_to_same_work_chain"], " x", 2) if same else "-"]
        )  # fmt: skip
    table = _table(
        ["worker nodes (`-c 3` each)", "OpsCD builds/s", "CPU per build, all processes",
         "raw no-op chains/s", "ratio", "raw chains doing the same work/s", "ratio"],
        rows,
    )  # fmt: skip
    one = data["by_nodes"]["1"]["runs"]
    cpu_rows = []
    for key, label, field in (
        ("opscd", "OpsCD build", "cpu_ms_per_build"),
        ("same_work_chain", "raw chain, same work", "cpu_ms_per_chain"),
        ("raw_chain", "raw no-op chain", "cpu_ms_per_chain"),
    ):
        parts = {part: _median([run[field].get(part, 0) for run in one[key]]) for part in CPU_PARTS}
        cpu_rows.append(
            [label, *(f"{value:.1f}" for value in parts.values()), f"{sum(parts.values()):.1f}"]
        )
    cpu_table = _table(["CPU ms per item, one node", *CPU_PARTS.values(), "total"], cpu_rows)
    return (
        f"{table}\n\nBuild: {data['build']}. Pushes go through the {data['enqueue']}. "
        "Throughput = builds ÷ (last build finished - first push sent). *Same work*: a "
        "raw Celery chain running the same `git init`, `remote add`, `fetch --depth=1` of "
        "the commit over HTTP with credentials and `checkout`, then the same `sh` script, "
        "without OpsCD's rows, logs and signals. Every build succeeded. All nodes share "
        "this machine's 2 cores, so more nodes cannot add CPU here: the rows show what "
        "running more nodes costs (CPU per build), not the capacity of more hosts.\n\n"
        "Where the CPU goes (median of the runs; on 2 cores everything together has at "
        f"most 2000 ms of CPU per second):\n\n{cpu_table}\n"
    )


def _heartbeats(data: dict[str, Any]) -> str:
    databases = [data, *([data["postgresql"]] if "runs" in data.get("postgresql", {}) else [])]
    expected = data["runs"][0]["expected_per_second"]

    def row(label: str, key: str, unit: str = "", digits: int = 1, note: str = "") -> list:
        return [label, *(_fig(d["summary"][key], unit, digits) if key in d["summary"] else "-"
                         for d in databases), note]  # fmt: skip

    rows = [
        row("heartbeats per second", "heartbeats_per_second", note=f"{expected:.0f} scheduled"),
        row("rows written per second", "writes_per_second",
            note="a heartbeat that changed nothing writes every other time"),
        row("`record_heartbeat` p50 (writes)", "write_p50_ms", " ms", 2,
            note="one UPDATE, committed as it runs"),
        row("`record_heartbeat` p99 (writes)", "write_p99_ms", " ms", 2),
        row("statements per second", "questions_per_second",
            note="MariaDB `Questions`, all clients; PostgreSQL: transactions of the database"),
        row("statements running, mean", "threads_running_mean", "", 2,
            note="sampled every 0.25 s"),
        row("database CPU", "database_cpu_percent", " %", note="of one core; target ≤ 5 %"),
    ]  # fmt: skip
    table = _table(["figure", *(d["database"] for d in databases), "note"], rows)
    errors = sum(run["errors"] for d in databases for run in d["runs"])
    skipped = data.get("postgresql", {}).get("skipped")
    return (
        f"{table}\n\n{data['agents']} simulated agents in {data['processes']} processes call "
        f"OpsCD's own `workers.heartbeats.record_heartbeat` every {data['interval_s']:.0f} s "
        f"for {data['seconds']:.0f} s per run, their phases spread over the interval, as "
        "nodes' heartbeat threads do (a heartbeat writes when something the node knows "
        "changed, and at least every `workers.lease.touch_interval`: 4 s by default); "
        f"failed writes: {errors}; agent rows at the end: {data['agent_rows']}."
        + (f" PostgreSQL not measured: {skipped}." if skipped else "")
        + "\n"
    )


def _brokers(scenarios: dict[str, Any]) -> str:
    """Dispatch, one node's builds/s and a killed node's rerun, per broker, from one run."""
    rabbit = scenarios["brokers"]["scenarios"]
    both = {"Redis": scenarios, "RabbitMQ": rabbit}

    def dispatch(found: dict[str, Any], key: str) -> str:
        if "dispatch" not in found:
            return "-"
        figures = found["dispatch"]["summary"][key]
        return f"{_fig(figures['p50_ms'], ' ms')} / {_fig(figures['p99_ms'], ' ms')}"

    def per_second(found: dict[str, Any], key: str) -> str:
        one = found.get("pipelines", {}).get("by_nodes", {}).get("1")
        return _fig(one["summary"][key]) if one else "-"

    def again(found: dict[str, Any]) -> str:
        kill = found.get("node_kill")
        return _fig(kill["summary"]["again_s"], " s", 2) if kill else "-"

    rows = [
        ["dispatch p50 / p99: request → first stage", *(dispatch(f, "first_stage")
                                                        for f in both.values())],
        ["dispatch p50 / p99: Celery's own no-op", *(dispatch(f, "celery") for f in both.values())],
        ["builds per second, 1 node (-c 3)", *(per_second(f, "opscd") for f in both.values())],
        ["raw no-op chains per second, 1 node", *(per_second(f, "raw_chain")
                                                  for f in both.values())],
        ["SIGKILL of a node → its build running on the other", *(again(f)
                                                                 for f in both.values())],
    ]  # fmt: skip
    table = _table(["figure", *both], rows)
    return (
        f"{table}\n\nThe RabbitMQ figures come from a bench process of their own on a "
        "RabbitMQ node the bench starts (free ports, its own data), with the same scenarios "
        "and plan as the Redis ones of this run: durable quorum queues and publisher "
        "confirms, as OpsCD runs on RabbitMQ. The kill: a build runs "
        f"{rabbit.get('node_kill', {}).get('running_before_kill_s', 8):.0f} s on one of two "
        "idle nodes, then that node (main process and pool) gets SIGKILL; measured until "
        "the build's next run holds a slot on the other node. On Redis the reaper does "
        "that once the node's heartbeats are overdue (CICD_AGENT_OFFLINE_AFTER, 10 s, and "
        "its sweep every CICD_REAPER_INTERVAL, 10 s); on RabbitMQ the broker gives the "
        "stage back when the connection drops and the node's queue hands it to a live node "
        "(cicd.broker.node_queue).\n"
    )


def _memory(data: dict[str, Any]) -> str:
    labels = {
        "web_opscd": "OpsCD web (gunicorn master + 2 workers)",
        "web_baseline": "bare Flask, same gunicorn",
        "web_durable": "durable Flask (INSERT + RPUSH), same gunicorn",
        "worker_opscd": "OpsCD worker node (main + 3 pool processes)",
        "worker_noop": "no-op Celery worker node, same options",
    }
    rows = [
        [label, f"{data[key]['idle_rss_mib']:.0f} MiB", f"{data[key]['load_rss_mib']:.0f} MiB",
         f"{data[key]['idle_pss_mib']:.0f} MiB", f"{data[key]['load_pss_mib']:.0f} MiB"]
        for key, label in labels.items()
        if key in data
    ]  # fmt: skip
    table = _table(
        ["process tree", "RSS idle", "RSS peak under load", "PSS idle", "PSS peak under load"],
        rows,
    )
    return (
        f"{table}\n\nSummed over the process tree, sampled during the webhook runs (web) and "
        "the one-node pipeline runs (workers). RSS counts the pages a fork shares once per "
        "process; PSS divides them among the processes that share them. A worker's RSS "
        "peak also counts its git and sh children between fork and exec, when each is "
        "briefly a copy of its pool process; its PSS barely moves.\n"
    )


def _host_kill(data: dict[str, Any]) -> str:
    summary, bound = data["summary"], data["offline_after_s"]
    rows = [
        ["kill → rerun recorded (reaper)", _fig(summary["rerun_s"], " s", 1), "attempt 2 seen"],
        ["kill → rerun's script starts", _fig(summary["script_s"], " s", 1),
         "first tick on the other agent's disk"],
        ["the same, in `CICD_AGENT_OFFLINE_AFTER`s", _fig(summary["script_over_bound"], " x", 2),
         f"the bound: {bound:.0f} s"],
    ]  # fmt: skip
    return (
        f"{_table(['figure', 'measured', 'note'], rows)}\n\nA control host and two agent hosts "
        "in network namespaces (`tests/support/fleet.py`); each run kills every process of the "
        "agent host running a build. The rest of the time after the bound is the reaper's "
        "sweep interval (`CICD_REAPER_INTERVAL`, 2 s here) and the rerun's clone.\n"
    )


def _maven_cache(data: dict[str, Any]) -> str:
    labels = {
        "cache_section": "ci.yaml `cache: {paths: [.m2/repository]}`",
        "java_default": "Java default (`build: {language: java}`)",
    }
    rows = []
    for variant, result in data["variants"].items():
        summary = result["summary"]
        rows.append(
            [labels.get(variant, variant), _fig(summary["cold_duration_s"], " s", 2),
             _fig(summary["warm_duration_s"], " s", 2), _fig(summary["speedup"], " x", 2),
             _fig(summary["cold_build_stage_s"], " s", 2),
             _fig(summary["warm_build_stage_s"], " s", 2),
             f"{_fig(summary['cold_requests'], '', 0)} ({_fig(summary['cold_jar'], '', 0)} "
             f"jars, {_fig(summary['cold_declared_jars'], '', 0)} of them the declared "
             f"dependencies'; {_fig(summary['cold_pom'], '', 0)} poms)",
             _fig(summary["warm_requests"], "", 0)]
        )  # fmt: skip
    table = _table(
        ["cache asked for by", "cold build", "warm build", "speedup", "cold build stage",
         "warm build stage", "requests served, cold", "requests served, warm"],
        rows,
    )  # fmt: skip
    said = []
    for variant, result in data["variants"].items():
        last = result["runs"][-1]
        for when in ("cold", "warm"):
            lines = "; ".join(f"`{line}`" for line in last[when]["cache_log"]) or "nothing"
            said.append(f"- {labels.get(variant, variant)}, {when}: {lines}")
    return (
        f"{table}\n\nA Maven project with {data['dependencies']} declared dependencies "
        "(commons-*, guava, httpclient, jsoup, guice, junit, slf4j, …), pushed twice to `main` "
        "(the second push a new commit), built by one agent with the docker executor "
        "(podman's Docker API, the host's `/usr` lent read-only, network host). Its Maven "
        "settings.xml (`CICD_MAVEN_SETTINGS`) mirrors `*` to a static HTTP server on "
        f"127.0.0.1 over `{data['repository']}` and keeps no `localRepository`, so only the "
        "build's cache keeps the artifacts. Every run is a new project, so its first build "
        "finds no cache. Build times are the task's (`started_at` → `finished_at`: clone, "
        "build with the cache's restore and save, publish); the cold build is the baseline. "
        "On loopback a download costs almost nothing: the warm build saves Maven's "
        "resolution, not a network's latency. What the builds said of their cache (last "
        "run):\n\n" + "\n".join(said) + "\n"
    )


def _history(data: dict[str, Any]) -> str:
    summary = data["summary"]
    mb = 1 / 1e6
    rows = [
        ["bytes the git server sent", _fig(summary["cold_bytes_served"], " MB", 2, mb),
         _fig(summary["warm_bytes_served"], " MB", 3, mb),
         _fig(summary["bytes_ratio"], " %", 2, 100)],
        ["clone stage", _fig(summary["cold_clone_s"], " s", 2),
         _fig(summary["warm_clone_s"], " s", 2), _fig(summary["clone_speedup"], " x faster", 2)],
        ["whole build", _fig(summary["cold_duration_s"], " s", 2),
         _fig(summary["warm_duration_s"], " s", 2), "-"],
    ]  # fmt: skip
    table = _table(["figure", "cold (no mirror)", "warm (one new commit)", "warm / cold"], rows)
    return (
        f"{table}\n\nA repository of {data['commits']:,} commits, each rewriting one of "
        f"{data['files']} files with {data['blob_bytes']:,} random bytes "
        f"(incompressible: its pack is {data['pack_bytes'] / 1e6:.1f} MB, with a bitmap, as "
        "a forge keeps it; made by `git fast-import` in "
        f"{data['made_in_s']:.1f} s), served by OpsCD's git server (`cicd/gitserve.py`, "
        "bytes of its answers counted) and built with `clone: {depth: full}` by one worker "
        "node (shell executor). Each run empties the agent's `CICD_CACHE_DIR`, builds the head "
        "(cold), pushes one new commit and builds it (warm). The clone stage is the one-commit "
        "fetch of the pushed commit, then the mirror's refresh from the forge (all of history "
        "when cold, the new commit when warm) and the history's copy from the mirror into the "
        "checkout.\n"
    )


def render(results: dict[str, Any]) -> str:
    machine, versions, meta = results["machine"], results["versions"], results["meta"]
    background = meta["background_before"]
    scenarios = results["scenarios"]
    out = [
        "# Benchmarks\n",
        f"Measured by `{meta['command']}` ({meta['seconds']:.0f} s, {meta['started']}, "
        f"commit {meta['commit'] or 'unknown'}); the raw figures are in `bench/results.json`. "
        f"Every figure is the median of {meta['plan']['runs']} runs with the min-max in "
        "brackets; each baseline was measured in the same run, alternating with OpsCD. "
        f"Before the run the machine was {background['cpu_busy_percent']:.0f} % busy "
        f"(load average {background['load_average_1min']:.2f}). Share of the CPU that other "
        "processes used while each scenario ran (more than a few % makes that scenario's "
        "figures low and noisy): "
        + ", ".join(
            f"{name} {percent:.0f} %"
            for name, percent in meta.get("other_processes_cpu_percent", {}).items()
        )
        + ".\n",
        "## Machine and versions\n",
        _table(
            ["", ""],
            [
                ["CPU", f"{machine['cpu_model']}, {machine['cores']} cores"],
                ["memory", f"{machine['memory_gib']} GiB"],
                ["system", f"{machine['os']}, Linux {machine['kernel']}"],
                ["Python", versions["python"]],
                ["Celery / kombu", f"{versions['celery']} / {versions['kombu']}"],
                ["redis-py / Redis server", f"{versions['redis']} / {versions['redis_server']}"],
                ["MariaDB", versions["mariadb"]],
                ["Flask / gunicorn", f"{versions['flask']} / {versions['gunicorn']}"],
                ["SQLAlchemy / PyMySQL", f"{versions['sqlalchemy']} / {versions['pymysql']}"],
                ["load generator", versions["wrk"] or "wrk"],
                ["git", versions["git"] or "git"],
            ],
        ),
        "\nEverything runs on this one machine and shares its cores: MariaDB, Redis, "
        "gunicorn, the worker nodes, the git server the builds clone from and the load "
        "generator (its share is in the webhook table).\n",
    ]
    if results.get("targets"):
        rows = [[t["target"], t["measured"], "yes" if t["met"] else "**no**"]
                for t in results["targets"]]  # fmt: skip
        out += ["## Targets\n", _table(["target", "measured", "met"], rows) + "\n"]
    sections = (
        ("webhook", "1. Webhook throughput", _webhook),
        ("dispatch", "2. Dispatch latency", _dispatch),
        ("pipelines", "3. and 4. Pipeline throughput and scale", _pipelines),
        ("heartbeats", "4. 200 agents heartbeating", _heartbeats),
        ("memory", "5. Memory", _memory),
        ("host_kill", "6. An agent host killed under a build", _host_kill),
        ("maven_cache", "7. Dependency cache: a Maven build, cold then warm", _maven_cache),
        ("history", "8. Warm checkouts of a long history", _history),
        ("brokers", "9. The broker: Redis and RabbitMQ", lambda data: _brokers(scenarios)),
    )
    for key, title, section in sections:
        if scenarios.get(key):
            out += [f"## {title}\n", section(scenarios[key])]
    return "\n".join(out)
