"""The scenarios. Each measures OpsCD beside a baseline in the same run and returns plain data.

1. :func:`webhook_throughput`: ``POST /webhooks/gitlab`` under wrk, beside two bare
   Flask endpoints under the same gunicorn options: parse JSON and one RPUSH, and the
   same after one INSERT committed in MariaDB (as durable as OpsCD).
2. :func:`dispatch_latency`: paced pushes, idle workers: from sending the
   webhook to the first stage starting on a worker and to the build script
   starting, beside Celery's own publish-to-start of a no-op task.
3. and 4. :func:`pipelines`: builds of ``script: true`` per second with 1, 2
   and 4 worker nodes (``-c 3``), beside raw Celery chains of three no-op
   tasks and (one node) chains doing the same git fetch and ``sh`` without
   OpsCD's bookkeeping.
4. :func:`heartbeats`: 200 simulated agents writing ``agent_states`` every 2 s, on
   MariaDB and on PostgreSQL.
5. Memory is sampled during 1 and 3 (``memory``, filled in place).
7. and 8. :mod:`bench.caches`: a Maven build's dependency cache (cold, then warm) and
   warm checkouts of a long history.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from bench.services import PostgreSQL, find_process, tree_cpu_seconds, tree_pss, tree_rss
from bench.stack import RssSampler, Stack, epoch
from bench.stats import latency_summary, percentile, spread
from cicd import processes

__all__ = [
    "Plan",
    "FULL",
    "SMOKE",
    "webhook_throughput",
    "dispatch_latency",
    "pipelines",
    "heartbeats",
]

LUA_SCRIPT = Path(__file__).resolve().parent / "webhook.lua"
OPSCD_APP = processes.WEB_APP
BASELINE_APP = "bench.baseline_app:create_app()"
DURABLE_APP = "bench.baseline_app:create_durable_app()"
OPSCD_WORKER = processes.WORKER_APP
NOOP_WORKER = "bench.noop_app"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """How much of each scenario to run."""

    runs: int  # repetitions of every measurement (median and min-max over them)
    wrk_seconds: int
    wrk_warmup_seconds: int
    connections: int  # wrk connections (gunicorn serves 2 workers x 8 threads)
    dispatch_samples: int  # paced pushes per run
    celery_samples: int  # paced no-op tasks per run
    pipelines: int  # builds per throughput run
    raw_chains: int  # no-op chains per throughput run
    work_chains: int  # same-work chains per throughput run
    nodes: tuple[int, ...]
    agents: int
    agent_processes: int
    heartbeat_seconds: float
    heartbeat_interval: float = 2.0
    fleet_offline_after: float = 10.0  # CICD_AGENT_OFFLINE_AFTER of the host-kill fleet
    history_commits: int = 5000  # commits of the warm-checkout scenario's repository
    history_blob_bytes: int = 11_000  # random bytes each of them writes: ≥ 50 MB in all


FULL = Plan(
    runs=3,
    wrk_seconds=8,
    wrk_warmup_seconds=2,
    connections=16,
    dispatch_samples=40,
    celery_samples=100,
    pipelines=120,
    raw_chains=600,
    work_chains=120,
    nodes=(1, 2, 4),
    agents=200,
    agent_processes=4,
    heartbeat_seconds=12,
)
SMOKE = Plan(
    runs=1,
    wrk_seconds=1,
    wrk_warmup_seconds=1,
    connections=4,
    dispatch_samples=3,
    celery_samples=5,
    pipelines=4,
    raw_chains=10,
    work_chains=4,
    nodes=(1, 2),
    agents=200,
    agent_processes=2,
    heartbeat_seconds=2,
    fleet_offline_after=4.0,
    history_commits=200,
)


def _idle_memory(memory: dict[str, Any], key: str, pid: int) -> None:
    memory[key] = {"idle_rss_mib": round(tree_rss(pid) / MIB, 1),
                   "idle_pss_mib": round(tree_pss(pid) / MIB, 1),
                   "load_rss_mib": 0.0, "load_pss_mib": 0.0}  # fmt: skip


def _load_memory(memory: dict[str, Any], key: str, sampler: RssSampler, name: str) -> None:
    entry = memory[key]
    entry["load_rss_mib"] = max(entry["load_rss_mib"], round(sampler.peak[name] / MIB, 1))
    entry["load_pss_mib"] = max(entry["load_pss_mib"], round(sampler.peak_pss[name] / MIB, 1))


def _ratio(numerators: list[float], denominators: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerators, denominators, strict=True) if b]


def _service_pids(stack: Stack) -> dict[str, int]:
    pids = {"redis": int(stack.redis.info("server")["process_id"])}
    mariadb = find_process("mariadbd", "mysqld")
    if mariadb is not None:
        pids["mariadb"] = mariadb
    return pids


# --- 1. webhook throughput -----------------------------------------------------------------


def _wrk(
    url: str, seconds: int, connections: int, body: Path, token: str, close: bool = True
) -> dict[str, Any]:
    """One wrk run (1 thread: the client shares the 2 cores); its summary and its CPU time.

    ``close``: a new connection for every request, as GitLab sends webhooks
    (and so gunicorn's two workers share the load evenly).
    """
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        f"{url}/webhooks/gitlab",
        "--",
        str(body),
        token,
        uuid.uuid4().hex[:12],
        "close" if close else "keep-alive",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    result = json.loads(line.removeprefix("BENCH_JSON "))
    result["client_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def _connections(stack: Stack) -> int:
    """MariaDB's count of connections opened since it started."""
    return int(stack.sql("SHOW GLOBAL STATUS LIKE 'Connections'")[0][1])


def webhook_throughput(stack: Stack, plan: Plan, memory: dict[str, Any]) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("the webhook scenario needs wrk: apt-get install -y wrk")
    from bench.baseline_app import DELIVERIES_DDL, DURABLE_QUEUE_KEY, QUEUE_KEY
    from cicd.broker import BUILD_QUEUE

    body = stack.tmp / "push-main.json"
    body.write_bytes(stack.payload("main"))
    stack.sql(DELIVERIES_DDL)
    urls = {
        "opscd": stack.web("web-opscd", OPSCD_APP),
        "baseline": stack.web("web-baseline", BASELINE_APP),
        "durable": stack.web("web-durable", DURABLE_APP),
    }
    queues = {"opscd": BUILD_QUEUE, "baseline": QUEUE_KEY, "durable": DURABLE_QUEUE_KEY}
    # The rows each durable system commits per delivery.
    counts = {
        "opscd": "SELECT COUNT(*) FROM task_details",
        "durable": "SELECT COUNT(*) FROM bench_deliveries",
    }

    def discard(queue: str) -> None:
        if queue == BUILD_QUEUE:
            stack.discard_builds(queue)  # OpsCD's builds are rows too
        else:
            stack.purge(queue)

    webs = {name: stack.processes[f"web-{name}"] for name in urls}
    services = _service_pids(stack)
    for name, url in urls.items():
        _idle_memory(memory, f"web_{name}", webs[name].pid)
        _wrk(url, plan.wrk_warmup_seconds, plan.connections, body, stack.secret)
        discard(queues[name])

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for run in range(plan.runs):
        for name in list(urls) if run % 2 == 0 else list(urls)[::-1]:
            rows_before = {system: stack.sql(query)[0][0] for system, query in counts.items()}
            cpu_before = {"server": tree_cpu_seconds(webs[name].pid)} | {
                service: tree_cpu_seconds(pid) for service, pid in services.items()
            }
            connections_before = _connections(stack)
            with RssSampler({"web": webs[name].pid}) as rss:
                result = _wrk(urls[name], plan.wrk_seconds, plan.connections, body, stack.secret)
            new_connections = _connections(stack) - connections_before
            cpu = {"server": tree_cpu_seconds(webs[name].pid) - cpu_before["server"]} | {
                service: tree_cpu_seconds(pid) - cpu_before[service]
                for service, pid in services.items()
            }
            queued = stack.broker_queue_length(queues[name])
            discard(queues[name])
            seconds = result["duration_us"] / 1e6
            requests_done = result["requests"]
            record = {
                "requests": requests_done,
                "seconds": round(seconds, 2),
                "rps": round(requests_done / seconds, 1),
                "p50_ms": round(result["latency_us"]["p50"] / 1000, 2),
                "p99_ms": round(result["latency_us"]["p99"] / 1000, 2),
                "max_ms": round(result["latency_us"]["max"] / 1000, 2),
                "errors": result["errors"],
                "queued_in_broker": queued,
                "server_cpu_ms_per_request": round(cpu["server"] * 1000 / requests_done, 3),
                "cpu_ms_per_request": {
                    key: round(value * 1000 / requests_done, 3) for key, value in cpu.items()
                },
                "client_cpu_share": round(result["client_cpu_s"] / seconds / 2, 3),
                # MariaDB connections opened (by anyone) per request: a pool that churns.
                "mariadb_connections_per_request": round(new_connections / requests_done, 3),
                "peak_rss_mib": round(rss.peak["web"] / MIB, 1),
                "peak_pss_mib": round(rss.peak_pss["web"] / MIB, 1),
            }
            if name in counts:
                record["rows_committed"] = stack.sql(counts[name])[0][0] - rows_before[name]
            runs[name].append(record)
            _load_memory(memory, f"web_{name}", rss, "web")
    summary = {
        name: {
            key: spread([r[key] for r in system_runs])
            for key in ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request", "client_cpu_share")
        }
        for name, system_runs in runs.items()
    }
    opscd_rps = [r["rps"] for r in runs["opscd"]]
    return {
        "load": f"wrk -t1 -c{plan.connections} -d{plan.wrk_seconds}s, unique X-Gitlab-Event-UUID",
        "runs": runs,
        "summary": summary,
        "ratio_rps": spread(_ratio(opscd_rps, [r["rps"] for r in runs["baseline"]])),
        "ratio_rps_durable": spread(_ratio(opscd_rps, [r["rps"] for r in runs["durable"]])),
    }


# --- 2. dispatch latency -------------------------------------------------------------------

STAMP_LINE = re.compile(r"^(\d{9,}\.\d{9})$", re.MULTILINE)


def _one_build(stack: Stack, session: requests.Session, url: str, body: bytes) -> dict:
    """Send one push of the ``stamp`` branch, wait for its build; where the time went."""
    sent = time.time()
    answer = stack.post(session, url, body)
    answered = time.time()
    task_id = int(answer["task_id"])
    stack.wait_finished(task_id, task_id, 1, timeout=60, poll=0.01)
    state, enqueued = stack.sql(
        "SELECT state, enqueued_at FROM task_states WHERE task_id = %s", (task_id,)
    )[0]
    if state != "success":
        raise RuntimeError(f"build {task_id} ended {state}")
    started = dict(
        stack.sql("SELECT stage, started_at FROM task_stages WHERE task_id = %s", (task_id,))
    )
    log = "".join(
        row[0]
        for row in stack.sql(
            "SELECT content FROM task_logs WHERE task_id = %s AND stage = 'build' ORDER BY id",
            (task_id,),
        )
    )
    stamp = STAMP_LINE.search(log)
    if stamp is None:
        raise RuntimeError(f"build {task_id} printed no timestamp:\n{log}")
    return {
        "response": answered - sent,
        "enqueued": epoch(enqueued) - sent,
        "first_stage": epoch(started["clone"]) - sent,
        "build_stage": epoch(started["build"]) - sent,
        "script": float(stamp.group(1)) - sent,
    }


def _one_stamp(stack: Stack) -> float:
    """Publish one no-op task and wait until it has started; publish-to-start in seconds."""
    from bench.noop_app import STAMPS_KEY, stamp

    stamp.apply_async((time.time(),))
    item = stack.redis.blpop([STAMPS_KEY], timeout=30)
    if item is None:
        raise TimeoutError("the no-op task did not start within 30 s")
    sent, started = json.loads(item[1])
    return started - sent


def dispatch_latency(stack: Stack, plan: Plan) -> dict[str, Any]:
    url = stack.web("web-opscd", OPSCD_APP)
    stack.nodes("bench", OPSCD_WORKER, 1)
    stack.nodes("benchnoop", NOOP_WORKER, 1)
    body = stack.payload("stamp")
    session = requests.Session()
    gap = 0.1  # idle time between samples: every sample finds the workers idle
    for _ in range(3):  # warm-up: connections, imports, the first clone
        _one_build(stack, session, url, body)
        _one_stamp(stack)
    samples: dict[str, list[list[float]]] = {
        key: [] for key in ("response", "enqueued", "first_stage", "build_stage", "script")
    }
    samples["celery"] = []
    for _ in range(plan.runs):
        builds = []
        for _ in range(plan.dispatch_samples):
            builds.append(_one_build(stack, session, url, body))
            time.sleep(gap)
        for key in builds[0]:
            samples[key].append([b[key] for b in builds])
        stamps = []
        for _ in range(plan.celery_samples):
            stamps.append(_one_stamp(stack))
            time.sleep(gap / 2)
        samples["celery"].append(stamps)
    per_run = {key: [latency_summary(run) for run in runs] for key, runs in samples.items()}
    summary = {
        key: {
            stat: spread([run[stat] for run in runs], 2) for stat in ("p50_ms", "p95_ms", "p99_ms")
        }
        for key, runs in per_run.items()
    }
    pooled = {
        key: latency_summary([x for run in runs for x in run]) for key, runs in samples.items()
    }
    return {
        "samples_per_run": {"opscd": plan.dispatch_samples, "celery": plan.celery_samples},
        "pacing": f"one at a time, {gap * 1000:.0f} ms idle between builds",
        "runs": per_run,
        "summary": summary,
        "pooled": pooled,
    }


# --- 3. and 4. pipeline throughput and scale -----------------------------------------------


class CpuMeter:
    """CPU seconds spent by each process tree (and this process) while a batch runs."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        snapshot = {
            name: sum(tree_cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()
        }
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        snapshot["bench"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        return snapshot

    def per_item_ms(self, count: int) -> dict[str, float]:
        """CPU milliseconds per item (build, chain) of each tree since the meter was made."""
        end = self._now()
        return {name: round((end[name] - self.start[name]) * 1000 / count, 2) for name in end}


def _opscd_batch(
    stack: Stack, client: Any, body: bytes, count: int, cpu_of: dict[str, list[int]] | None = None
) -> dict[str, Any]:
    """Send ``count`` pushes through the webhook code (in this process), wait for all builds."""
    cpu = CpuMeter(cpu_of or {})
    first_sent = time.time()
    ids = []
    for _ in range(count):
        answer = client.post("/webhooks/gitlab", data=body, headers=stack.headers())
        if answer.status_code != 202:
            raise RuntimeError(f"webhook answered {answer.status_code}: {answer.get_data()}")
        ids.append(int(answer.get_json()["task_id"]))
    sent = time.time() - first_sent
    done = stack.wait_finished(ids[0], ids[-1], count, timeout=60 + 2 * count, poll=0.1)
    if done["states"].get("success", 0) != count:
        raise RuntimeError(f"not every build succeeded: {done['states']}")
    nodes = stack.sql(
        "SELECT worker, COUNT(*) FROM task_states WHERE task_id BETWEEN %s AND %s GROUP BY worker",
        (ids[0], ids[-1]),
    )
    seconds = done["last_finished"] - first_sent
    return {
        "count": count,
        "seconds": round(seconds, 3),
        "per_second": round(count / seconds, 2),
        "enqueue_seconds": round(sent, 3),
        "builds_per_node": {str(node): n for node, n in nodes},
        "cpu_ms_per_build": cpu.per_item_ms(count),
    }


def _chain_batch(
    stack: Stack,
    count: int,
    work: dict[str, Any] | None,
    cpu_of: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """``count`` raw chains (no-op, or the same work as a build when ``work`` is given)."""
    from celery import chain

    from bench.noop_app import DONE_KEY, done, noop, work_build, work_clone, work_publish

    stack.purge(DONE_KEY)
    cpu = CpuMeter(cpu_of or {})
    first_sent = time.time()
    for i in range(count):
        if work is None:
            chain(noop.s(i), noop.s(), done.s()).apply_async()
        else:
            chain(work_clone.s(work), work_build.s(), work_publish.s()).apply_async()
    deadline = time.monotonic() + 60 + 2 * count
    while stack.redis.llen(DONE_KEY) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stack.redis.llen(DONE_KEY)} of {count} chains finished")
        time.sleep(0.05)
    last = max(float(x) for x in stack.redis.lrange(DONE_KEY, 0, -1))
    seconds = last - first_sent
    return {
        "count": count,
        "seconds": round(seconds, 3),
        "per_second": round(count / seconds, 2),
        "cpu_ms_per_chain": cpu.per_item_ms(count),
    }


def pipelines(stack: Stack, plan: Plan, memory: dict[str, Any]) -> dict[str, Any]:
    from cicd.web import create_app

    client = create_app(stack.settings).test_client()
    body = stack.payload("main")
    work_dir = stack.tmp / "work"
    work_dir.mkdir(exist_ok=True)
    work = {
        "root": str(work_dir),
        "url": stack.clone_url,
        "sha": stack.repo.shas["main"],
        "authorization": stack.git_authorization,
    }
    services = {name: [pid] for name, pid in _service_pids(stack).items()}
    by_nodes: dict[str, Any] = {}
    for count in plan.nodes:
        opscd = stack.nodes("bench", OPSCD_WORKER, count)
        noop = stack.nodes("benchnoop", NOOP_WORKER, count)
        _opscd_batch(stack, client, body, 2 * count)  # warm-up: every pool process connects
        _chain_batch(stack, 6 * count, None)
        if count == 1:
            _idle_memory(memory, "worker_opscd", opscd[0].pid)
            _idle_memory(memory, "worker_noop", noop[0].pid)
        runs: dict[str, list[dict[str, Any]]] = {"opscd": [], "raw_chain": []}
        if count == 1:
            runs["same_work_chain"] = []
        opscd_cpu = {"workers": [node.pid for node in opscd], **services}
        noop_cpu = {"workers": [node.pid for node in noop], **services}
        for _ in range(plan.runs):
            with RssSampler({node.name: node.pid for node in opscd}) as rss:
                runs["opscd"].append(_opscd_batch(stack, client, body, plan.pipelines, opscd_cpu))
            with RssSampler({node.name: node.pid for node in noop}) as noop_rss:
                runs["raw_chain"].append(_chain_batch(stack, plan.raw_chains, None, noop_cpu))
            if count == 1:
                runs["same_work_chain"].append(
                    _chain_batch(stack, plan.work_chains, work, noop_cpu)
                )
                _load_memory(memory, "worker_opscd", rss, opscd[0].name)
                _load_memory(memory, "worker_noop", noop_rss, noop[0].name)
        result: dict[str, Any] = {
            "runs": runs,
            "summary": {key: spread([r["per_second"] for r in rs], 2) for key, rs in runs.items()},
            "ratio_to_raw_chain": spread(
                _ratio(
                    [r["per_second"] for r in runs["opscd"]],
                    [r["per_second"] for r in runs["raw_chain"]],
                )
            ),
        }
        if count == 1:
            result["ratio_to_same_work_chain"] = spread(
                _ratio(
                    [r["per_second"] for r in runs["opscd"]],
                    [r["per_second"] for r in runs["same_work_chain"]],
                )
            )
        by_nodes[str(count)] = result
    return {
        "build": 'ci.yaml build: {script: "true"}, shell executor, no publish section',
        "enqueue": "webhook code in the bench process (Flask test client): rows, then the chain",
        "by_nodes": by_nodes,
    }


# --- 4. heartbeats of simulated agents -----------------------------------------------------

STATUS_VARIABLES = (
    "Questions",
    "Com_select",
    "Com_update",
    "Com_insert",
    "Com_commit",
    "Threads_running",
    "Threads_connected",
)


class _MariaDBProbe:
    """What the heartbeat runs read of MariaDB: its global status and its process's CPU."""

    name = "MariaDB"

    def __init__(self, stack: Stack) -> None:
        self.stack, self.pid = stack, find_process("mariadbd", "mysqld")

    def counters(self) -> dict[str, int]:
        names = ",".join(f"'{name}'" for name in STATUS_VARIABLES)
        rows = self.stack.sql(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names})")
        return {name: int(value) for name, value in rows}

    def running(self) -> tuple[int, int]:
        status = self.counters()
        return status["Threads_running"], status["Threads_connected"]

    def statements(self, before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {"all": after["Questions"] - before["Questions"],
                **{name.removeprefix("Com_"): after[name] - before[name]
                   for name in STATUS_VARIABLES if name.startswith("Com_")}}  # fmt: skip


class _PostgreSQLProbe:
    """The same of PostgreSQL: its statistics of the bench database, its postmaster's tree."""

    name = "PostgreSQL"

    def __init__(self, server: PostgreSQL, database: str) -> None:
        self.server, self.database, self.pid = server, database, server.server_pid()
        self.connection = server.connect()  # one, as the MariaDB probe's: no backend per read

    def own_cpu_seconds(self) -> float:
        """CPU of the probe's own backend (its reads of the statistics), not the agents'."""
        return tree_cpu_seconds(self.connection.info.backend_pid)

    def query(self, sql: str, params: tuple) -> list[tuple]:
        return list(self.connection.execute(sql, params).fetchall())

    def counters(self) -> dict[str, int]:
        ((commits, rollbacks, updated, fetched),) = self.query(
            "SELECT xact_commit, xact_rollback, tup_updated, tup_fetched FROM pg_stat_database"
            " WHERE datname = %s",
            params=(self.database,),
        )
        return {"transactions": commits + rollbacks, "update": updated, "fetched": fetched}

    def running(self) -> tuple[int, int]:
        ((active, connected),) = self.query(
            "SELECT count(*) FILTER (WHERE state = 'active'), count(*) FROM pg_stat_activity"
            " WHERE datname = %s",
            params=(self.database,),
        )
        return active, connected

    def statements(self, before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        # Each heartbeat statement runs in autocommit: a transaction of its own.
        return {"all": after["transactions"] - before["transactions"],
                "rows_updated": after["update"] - before["update"]}  # fmt: skip


def _heartbeat_run(plan: Plan, env: dict[str, str], probe: Any) -> dict[str, Any]:
    per_process = -(-plan.agents // plan.agent_processes)
    start_at = time.time() + 4.0  # meanwhile the processes import OpsCD and warm up
    children = []
    for first in range(0, plan.agents, per_process):
        args = [
            sys.executable,
            "-m",
            "bench.heartbeat_load",
            "--first",
            str(first),
            "--agents",
            str(min(per_process, plan.agents - first)),
            "--total",
            str(plan.agents),
            "--interval",
            str(plan.heartbeat_interval),
            "--seconds",
            str(plan.heartbeat_seconds),
            "--start-at",
            repr(start_at),
        ]
        children.append(
            subprocess.Popen(
                args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    time.sleep(max(0.0, start_at - time.time()))
    before = probe.counters()
    own = getattr(probe, "own_cpu_seconds", lambda: 0.0)
    cpu_before = (tree_cpu_seconds(probe.pid) - own()) if probe.pid else 0.0
    began = time.time()
    running, connected = [], []
    while time.time() < start_at + plan.heartbeat_seconds:
        active, open_connections = probe.running()
        running.append(active)
        connected.append(open_connections)
        time.sleep(0.25)
    after = probe.counters()
    elapsed = time.time() - began
    cpu = (tree_cpu_seconds(probe.pid) - own() - cpu_before) if probe.pid else None
    calls = written = errors = 0
    latency: list[float] = []
    lateness: list[float] = []
    for child in children:
        out, err = child.communicate(timeout=60)
        if child.returncode != 0:
            raise RuntimeError(f"simulated agents failed:\n{err}")
        result = json.loads(out.strip().splitlines()[-1])
        calls += result["calls"]
        written += result["written"]
        errors += result["errors"]
        latency += result["latency"]
        lateness += result["lateness"]
    statements = probe.statements(before, after)
    return {
        "heartbeats_per_second": round(calls / plan.heartbeat_seconds, 1),
        "writes_per_second": round(written / plan.heartbeat_seconds, 1),
        "expected_per_second": round(plan.agents / plan.heartbeat_interval, 1),
        "errors": errors,
        "write_p50_ms": round(percentile(latency, 50) * 1000, 2),
        "write_p99_ms": round(percentile(latency, 99) * 1000, 2),
        "late_p99_ms": round(percentile(lateness, 99) * 1000, 2),
        "questions_per_second": round(statements.pop("all") / elapsed, 1),
        "statements_per_second": {
            name: round(count / elapsed, 1) for name, count in statements.items()
        },
        "threads_running_mean": round(sum(running) / len(running), 2),
        "threads_running_max": max(running),
        "threads_connected_max": max(connected),
        "database_cpu_percent": round(100 * cpu / elapsed, 1) if cpu is not None else None,
    }


_HEARTBEAT_KEYS = (
    "heartbeats_per_second",
    "writes_per_second",
    "write_p50_ms",
    "write_p99_ms",
    "questions_per_second",
    "threads_running_mean",
    "threads_running_max",
    "database_cpu_percent",
)


def _heartbeat_runs(plan: Plan, env: dict[str, str], probe: Any) -> dict[str, Any]:
    runs = [_heartbeat_run(plan, env, probe) for _ in range(plan.runs)]
    return {
        "database": probe.name,
        "runs": runs,
        "summary": {
            key: spread([r[key] for r in runs], 2)
            for key in _HEARTBEAT_KEYS
            if runs[0][key] is not None
        },
    }


def heartbeats(stack: Stack, plan: Plan) -> dict[str, Any]:
    """The agents-scale scenario on MariaDB (the bench's database), then on PostgreSQL (a
    database of its own there, with OpsCD's schema), with the same simulated agents."""
    stack.stop_nodes()  # only the simulated agents write agent_states now
    result = _heartbeat_runs(plan, stack.env, _MariaDBProbe(stack))
    rows = stack.sql("SELECT COUNT(*) FROM agent_states WHERE hostname LIKE 'simagent%%'")[0][0]
    result.update(agents=plan.agents, interval_s=plan.heartbeat_interval,
                  seconds=plan.heartbeat_seconds, processes=plan.agent_processes,
                  agent_rows=rows)  # fmt: skip
    server = PostgreSQL.from_environment()
    try:
        database = server.create_database()
    except Exception as error:  # reported in the results and the report, not hidden
        result["postgresql"] = {"skipped": f"PostgreSQL is not reachable: {error}"}
        return result
    try:
        env = {**stack.env, "CICD_DATABASE_URL": server.url(database)}
        subprocess.run([sys.executable, "-m", "cicd.cli", "migrate"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        probe = _PostgreSQLProbe(server, database)
        result["postgresql"] = _heartbeat_runs(plan, env, probe)
        probe.connection.close()
        result["postgresql"]["agent_rows"] = server.query(
            "SELECT COUNT(*) FROM agent_states WHERE hostname LIKE %s", database, ("simagent%",)
        )[0][0]
    finally:
        server.drop_database(database)
    return result


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
