"""``python -m bench``: set up, run every scenario, tear down, write the results and the doc."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import brokers, caches, fleet, scenarios
from bench.report import render
from bench.services import ROOT, ForeignCpu, find_process
from bench.stack import Stack

__all__ = ["main"]

SCENARIOS = (
    "webhook",
    "dispatch",
    "pipelines",
    "heartbeats",
    "host_kill",
    "maven_cache",
    "history",
    "node_kill",
    "brokers",
)
PACKAGES = ("celery", "kombu", "redis", "flask", "gunicorn", "sqlalchemy", "pymysql")


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    memory = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
    os_release = Path("/etc/os-release")
    pretty = (
        re.search(r'^PRETTY_NAME="?([^"\n]+)', os_release.read_text(), re.MULTILINE)
        if (os_release.exists())
        else None
    )
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory.group(1)) / 1024 / 1024, 1) if memory else None,
        "os": pretty.group(1) if pretty else platform.platform(),
        "kernel": platform.release(),
    }


def _first_line(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _versions(stack: Stack) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        versions[package] = importlib.metadata.version(package)
    versions["redis_server"] = stack.redis.info("server")["redis_version"]
    versions["mariadb"] = stack.mysql.query("SELECT VERSION()")[0][0]
    wrk = _first_line(["wrk", "--version"])
    versions["wrk"] = wrk.split(" Copyright")[0] if wrk else None
    git = _first_line(["git", "--version"])
    versions["git"] = git.removeprefix("git version ") if git else None
    return versions


def _background(wait: float) -> dict[str, Any]:
    """How busy the machine is before the bench starts anything: other work skews every figure.

    Waits up to ``wait`` seconds for it to be quiet (under 10 % busy over 2 s).
    """
    deadline = time.monotonic() + wait
    while True:
        busy = psutil.cpu_percent(interval=2.0)
        if busy <= 10 or time.monotonic() >= deadline:
            break
        _log(f"waiting for the machine to be quiet ({busy:.0f} % busy)")
        time.sleep(5)
    return {"cpu_busy_percent": busy, "load_average_1min": round(os.getloadavg()[0], 2)}


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and whether it is met."""
    out: list[dict[str, Any]] = []
    found = results["scenarios"]
    if "webhook" in found:
        webhook = found["webhook"]
        ratio = webhook["ratio_rps"]["median"]
        durable = webhook["ratio_rps_durable"]["median"]
        out.append(
            {
                "target": "webhook requests/s ≥ 0.7x the durable baseline (INSERT + RPUSH)",
                "measured": f"{durable:.2f} x",
                "met": durable >= 0.7,
            }
        )
        out.append(
            {
                "target": "webhook requests/s ≥ 0.3x the bare baseline (RPUSH)",
                "measured": f"{ratio:.2f} x",
                "met": ratio >= 0.3,
            }
        )
        cpu = webhook["summary"]["opscd"]["server_cpu_ms_per_request"]["median"]
        out.append(
            {
                "target": "webhook gunicorn CPU per delivery ≤ 1.5 ms",
                "measured": f"{cpu:.2f} ms",
                "met": cpu <= 1.5,
            }
        )
    if "dispatch" in found:
        summary = found["dispatch"]["summary"]
        celery = summary["celery"]["p50_ms"]["median"]
        for key, label in (("first_stage", "first stage starts"), ("script", "script starts")):
            p50, p99 = summary[key]["p50_ms"]["median"], summary[key]["p99_ms"]["median"]
            out.append(
                {
                    "target": f"dispatch p50 (request → {label}) ≤ 2 x Celery's own p50",
                    "measured": f"{p50:.1f} ms vs 2 x {celery:.1f} ms",
                    "met": p50 <= 2 * celery,
                }
            )
            out.append(
                {
                    "target": f"dispatch p99 (request → {label}) < 50 ms",
                    "measured": f"{p99:.1f} ms",
                    "met": p99 < 50,
                }
            )
    if "pipelines" in found and "ratio_to_same_work_chain" in found["pipelines"]["by_nodes"]["1"]:
        one = found["pipelines"]["by_nodes"]["1"]
        ratio = one["ratio_to_same_work_chain"]["median"]
        out.append(
            {
                "target": "builds/s (1 node, -c 3) ≥ 0.8 x a raw chain doing the same work",
                "measured": f"{ratio:.2f} x",
                "met": ratio >= 0.8,
            }
        )
        runs = one["runs"]
        own = statistics.median(
            sum(run["cpu_ms_per_build"].values()) for run in runs["opscd"]
        ) - statistics.median(
            sum(run["cpu_ms_per_chain"].values()) for run in runs["same_work_chain"]
        )
        out.append(
            {
                "target": "OpsCD's own CPU per build (total - the same-work chain's) ≤ 20 ms",
                "measured": f"{own:.1f} ms",
                "met": own <= 20,
            }
        )
    rabbit = found.get("brokers", {}).get("scenarios", {})
    if "node_kill" in rabbit:
        again = rabbit["node_kill"]["summary"]["again_s"]["median"]
        out.append(
            {
                "target": "RabbitMQ: a SIGKILLed node's build runs again on another node ≤ 5 s",
                "measured": f"{again:.2f} s",
                "met": again <= 5,
            }
        )
    if "heartbeats" in found:
        beats = found["heartbeats"]
        for data in (beats, beats.get("postgresql", {})):
            if "runs" not in data or "database_cpu_percent" not in data["summary"]:
                continue
            cpu = data["summary"]["database_cpu_percent"]["median"]
            out.append(
                {
                    "target": f"200 agents heartbeating cost {data['database']} ≤ 5 % of a core",
                    "measured": f"{cpu:.1f} %",
                    "met": cpu <= 5,
                }
            )
    memory = found.get("memory", {})
    if "worker_opscd" in memory and "worker_noop" in memory:
        ours, noop = memory["worker_opscd"]["load_pss_mib"], memory["worker_noop"]["load_pss_mib"]
        ratio = ours / noop if noop else float("inf")
        out.append(
            {
                "target": "worker node PSS under load ≤ 1.3 x a no-op Celery node's",
                "measured": f"{ours:.0f} MiB vs {noop:.0f} MiB ({ratio:.2f} x)",
                "met": ratio <= 1.3,
            }
        )
    if "maven_cache" in found:
        for variant, label in caches.MAVEN_VARIANTS.items():
            summary = found["maven_cache"]["variants"][variant]["summary"]
            requests = summary["warm_requests"]["median"]
            speedup = summary["speedup"]["median"]
            out.append(
                {
                    "target": f"maven warm build ({label}) downloads nothing",
                    "measured": f"{requests:.0f} requests",
                    "met": requests == 0,
                }
            )
            out.append(
                {
                    "target": f"maven warm build ({label}) ≥ 3x faster than cold",
                    "measured": f"{speedup:.2f} x",
                    "met": speedup >= 3,
                }
            )
    if "history" in found:
        summary = found["history"]["summary"]
        ratio, speedup = summary["bytes_ratio"]["median"], summary["clone_speedup"]["median"]
        out.append(
            {
                "target": "history: warm checkout's bytes served ≤ 5% of cold",
                "measured": f"{100 * ratio:.2f} %",
                "met": ratio <= 0.05,
            }
        )
        out.append(
            {
                "target": "history: warm clone stage ≥ 5x faster than cold",
                "measured": f"{speedup:.2f} x",
                "met": speedup >= 5,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="every scenario, tiny: seconds")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "bench" / "results.json",
        help="results JSON (default bench/results.json)",
    )
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="markdown report (default docs/benchmarks.md; with --smoke, none)",
    )
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--runs", type=int, help="repetitions of each measurement")
    parser.add_argument("--nodes", type=int, nargs="+", help="node counts of the pipelines")
    parser.add_argument(
        "--broker-url",
        help="measure on this broker (RabbitMQ, amqp://...) instead of the Redis database; "
        "the brokers scenario runs a bench process with it",
    )
    parser.add_argument(
        "--redis-db",
        type=int,
        default=int(os.environ.get("OPSCD_BENCH_REDIS_DB", "12")),
        help="Redis database number of the bench (flushed)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle (under 10 %% busy)",
    )
    args = parser.parse_args(argv)

    plan = scenarios.SMOKE if args.smoke else scenarios.FULL
    if args.runs:
        plan = scenarios.Plan(**{**scenarios.plan_dict(plan), "runs": args.runs})
    if args.nodes:
        plan = scenarios.Plan(**{**scenarios.plan_dict(plan), "nodes": tuple(args.nodes)})
    doc = (
        args.doc
        if args.doc is not None
        else (None if args.smoke or args.broker_url else ROOT / "docs" / "benchmarks.md")
    )
    began = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    background = _background(args.wait_quiet)
    if background["cpu_busy_percent"] > 10:
        _log(
            f"the machine is busy before the bench starts ({background['cpu_busy_percent']:.0f} % "
            "CPU): expect low and noisy figures"
        )
    if args.broker_url:  # another Redis database for the bench's own reports, too
        stack = Stack(args.redis_db - 1, _log, args.broker_url, **brokers.AMQP_SETTINGS)
    else:
        stack = Stack(args.redis_db, _log)
    memory: dict[str, Any] = {}
    results: dict[str, Any] = {"scenarios": {}}
    durations: dict[str, float] = {}
    others: dict[str, float] = {}
    try:
        stack.start()
        results["machine"] = _machine()
        results["versions"] = _versions(stack)
        services = [
            pid
            for pid in (
                find_process("mariadbd", "mysqld"),
                stack.redis.info("server")["process_id"],
            )
            if pid
        ]
        steps = {
            "webhook": lambda: scenarios.webhook_throughput(stack, plan, memory),
            "dispatch": lambda: scenarios.dispatch_latency(stack, plan),
            "pipelines": lambda: scenarios.pipelines(stack, plan, memory),
            "heartbeats": lambda: scenarios.heartbeats(stack, plan),
            "host_kill": lambda: fleet.host_kill(plan.runs, plan.fleet_offline_after),
            "node_kill": lambda: brokers.node_kill(stack, plan.runs),
            "brokers": lambda: brokers.rabbitmq("smoke" if args.smoke else "full", plan.runs, _log),
            "maven_cache": lambda: caches.maven_cache(stack, plan),
            "history": lambda: caches.history(stack, plan),
        }
        for name in SCENARIOS:
            if name not in args.only:
                continue
            _log(f"scenario {name}")
            step_began = time.monotonic()
            foreign = ForeignCpu(services)
            results["scenarios"][name] = steps[name]()
            durations[name] = round(time.monotonic() - step_began, 1)
            others[name] = foreign.percent()
            if others[name] > 10:
                _log(f"other processes used {others[name]:.0f} % of the CPU during {name}")
        results["scenarios"]["memory"] = memory
    finally:
        stack.close()
    results["meta"] = {
        "mode": "smoke" if args.smoke else "full",
        "started": started_at,
        "seconds": round(time.monotonic() - began, 1),
        "scenario_seconds": durations,
        "plan": scenarios.plan_dict(plan),
        "command": "python -m bench" + (" --smoke" if args.smoke else ""),
        "commit": _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "background_before": background,
        "other_processes_cpu_percent": others,
        "database": stack.database,
        "redis_url": stack.redis_url,
        "broker_url": stack.broker_url,
    }
    results["targets"] = _targets(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    _log(f"results in {args.output}")
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render(results))
        _log(f"report in {doc}")
    for target in results["targets"]:
        _log(f"{'met   ' if target['met'] else 'MISSED'} {target['target']}: {target['measured']}")
    return 0
