"""Scenarios 7 and 8: what an agent keeps between builds, measured where users feel it.

7. :func:`maven_cache`: a Maven project with 35 dependencies, built twice on ``main``
   with the docker executor (podman's Docker API, the host's ``/usr`` lent read-only,
   network host), resolving from a Maven repository served over HTTP on 127.0.0.1 (Debian's
   ``/usr/share/maven-repo``) that counts what it serves. Cold: no cache yet; warm: a new
   commit, the cache the first build saved. Two ways of asking for the cache: ci.yaml's
   ``cache: {paths: [.m2/repository]}``, and the Java default (``build: {language:
   java}``, which keeps ``.m2/repository`` when the agent's settings.xml keeps no
   ``localRepository`` of its own). The baseline is the cold build itself.
8. :func:`history`: a repository of 5,000 commits and more than 50 MB built with ``clone:
   {depth: full}``, cold (an empty ``CICD_CACHE_DIR``), then again after one new commit
   (warm: the agent's mirror). The figures are the bytes the git server sent and the clone
   stage's duration; the baseline is the cold build.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.scenarios import Plan
from bench.services import MavenRepoServer
from bench.stack import Stack
from bench.stats import spread
from cicd import processes

__all__ = ["maven_cache", "history", "make_history_repo", "MAVEN_DEPENDENCIES", "MAVEN_VARIANTS"]

# Every one of them (and what it needs) is in Debian's /usr/share/maven-repo at this version.
MAVEN_DEPENDENCIES = (
    "commons-cli:commons-cli:1.5.0",
    "commons-codec:commons-codec:1.15",
    "commons-collections:commons-collections:3.2.2",
    "commons-io:commons-io:2.11.0",
    "commons-lang:commons-lang:2.6",
    "commons-logging:commons-logging:1.2",
    "commons-beanutils:commons-beanutils:1.9.4",
    "commons-validator:commons-validator:1.7",
    "org.apache.commons:commons-compress:1.22",
    "org.apache.commons:commons-lang3:3.12.0",
    "org.apache.commons:commons-text:1.10.0",
    "com.google.guava:guava:31.1-jre",
    "com.google.errorprone:error_prone_annotations:2.18.0",
    "org.apache.httpcomponents:httpclient:4.5.14",
    "org.apache.httpcomponents:httpcore:4.4.16",
    "org.jsoup:jsoup:1.15.3",
    "info.picocli:picocli:4.6.2",
    "org.hamcrest:hamcrest:2.2",
    "junit:junit:4.13.2",
    "org.apiguardian:apiguardian-api:1.1.2",
    "org.fusesource.jansi:jansi:2.4.0",
    "org.dom4j:dom4j:2.1.1",
    "jaxen:jaxen:1.1.6",
    "com.thoughtworks.qdox:qdox:2.0.3",
    "javax.inject:javax.inject:1",
    "aopalliance:aopalliance:1.0",
    "com.google.inject:guice:4.2.3",
    "org.apache.velocity:velocity:1.7",
    "com.univocity:univocity-parsers:2.9.1",
    "org.apache.xbean:xbean-reflect:4.5",
    "org.slf4j:slf4j-api:1.7.32",
    "org.slf4j:slf4j-simple:1.7.32",
    "org.tukaani:xz:1.9",
    "oro:oro:2.0.8",
    "xml-resolver:xml-resolver:1.2",
)

# Debian's packaged plugin versions (RECIPES: "Offline Maven"), as tests/projects/hello-maven.
POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.opscd.bench</groupId>
  <artifactId>deps</artifactId>
  <version>1.0.0</version>
  <packaging>jar</packaging>
  <properties>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
    <maven.compiler.release>17</maven.compiler.release>
  </properties>
  <dependencies>
{dependencies}
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId><artifactId>maven-clean-plugin</artifactId>
        <version>3.2.0</version>
        <dependencies><dependency><groupId>org.codehaus.plexus</groupId>
          <artifactId>plexus-utils</artifactId><version>3.4.2</version></dependency></dependencies>
      </plugin>
      <plugin><groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-resources-plugin</artifactId><version>3.3.0</version></plugin>
      <plugin><groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-compiler-plugin</artifactId><version>3.10.1</version></plugin>
      <plugin><groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-surefire-plugin</artifactId><version>2.22.3</version>
        <configuration><forkCount>0</forkCount><useSystemClassLoader>false</useSystemClassLoader>
        </configuration></plugin>
      <plugin><groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-jar-plugin</artifactId><version>3.3.0</version></plugin>
      <plugin><groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-install-plugin</artifactId><version>3.1.0</version></plugin>
    </plugins>
  </build>
</project>
"""
APP_JAVA = """\
package dev.opscd.bench;

/** Uses two of its dependencies, so the build compiles against the resolved jars. */
public class App {
    public static void main(String[] args) {
        System.out.println(org.apache.commons.lang3.StringUtils.capitalize("deps ")
            + com.google.common.base.Strings.repeat("ok", 1));
    }
}
"""
# The agent's Maven settings: every repository mirrored by the bench's HTTP server, and no
# <localRepository> (a cache of the agent's own would hide what the build's cache keeps).
MAVEN_SETTINGS = """\
<?xml version="1.0" encoding="UTF-8"?>
<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0">
  <interactiveMode>false</interactiveMode>
  <mirrors>
    <mirror><id>bench</id><url>{url}</url><mirrorOf>*</mirrorOf></mirror>
  </mirrors>
  <profiles>
    <profile>
      <id>no-checksums</id>
      <repositories><repository><id>central</id><url>https://repo.maven.apache.org/maven2</url>
        <releases><checksumPolicy>ignore</checksumPolicy></releases>
        <snapshots><enabled>false</enabled></snapshots></repository></repositories>
      <pluginRepositories><pluginRepository><id>central</id>
        <url>https://repo.maven.apache.org/maven2</url>
        <releases><checksumPolicy>ignore</checksumPolicy></releases>
        <snapshots><enabled>false</enabled></snapshots></pluginRepository></pluginRepositories>
    </profile>
  </profiles>
  <activeProfiles><activeProfile>no-checksums</activeProfile></activeProfiles>
</settings>
"""
HOSTTOOLS_IMAGE = "localhost/opscd-hosttools:latest"
CI_YAML = {
    "cache_section": (
        "cache:\n  paths: [.m2/repository]\n"
        f"build:\n  image: {HOSTTOOLS_IMAGE}\n"
        "  script: mvn -B -Dmaven.repo.local=.m2/repository package\n"
    ),
    "java_default": "build:\n  language: java\n",
}
MAVEN_VARIANTS = {"cache_section": "ci.yaml cache:", "java_default": "Java default"}
WARM_UP_CI = f'build:\n  image: {HOSTTOOLS_IMAGE}\n  script: "true"\n'


# --- what both scenarios share ---------------------------------------------------------------


def _seconds(start: str | None, end: str | None) -> float | None:
    """Seconds between two of the API's ISO times (``...Z``)."""
    if start is None or end is None:
        return None
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def _log(stack: Stack, task_id: int) -> str:
    rows = stack.sql("SELECT content FROM task_logs WHERE task_id = %s ORDER BY id", (task_id,))
    return "".join(row[0] for row in rows)


def _build(stack: Stack, client: Any, body: bytes, secret: str, timeout: float) -> dict[str, Any]:
    """One push through the webhook code (in this process), its build waited for; the
    task as the API shows it (states, stages and their times) and its log."""
    answer = client.post("/webhooks/gitlab", data=body, headers=stack.headers(secret))
    if answer.status_code != 202:
        raise RuntimeError(f"webhook answered {answer.status_code}: {answer.get_data()}")
    task_id = int(answer.get_json()["task_id"])
    stack.wait_finished(task_id, task_id, 1, timeout=timeout, poll=0.1)
    task = client.get(f"/api/tasks/{task_id}").get_json()
    log = _log(stack, task_id)
    if task["state"] != "success":
        raise RuntimeError(f"build {task_id} ended {task['state']}:\n{log[-4000:]}")
    stages = {s["stage"]: _seconds(s["started_at"], s["finished_at"]) for s in task["stages"]}
    return {
        "task_id": task_id,
        "state": task["state"],
        "duration_s": round(task["duration_seconds"], 3),
        "stage_s": {name: round(value, 3) for name, value in stages.items() if value is not None},
        "log": log,
    }


def _register(stack: Stack, project: str) -> tuple[str, str]:
    """Register ``project`` as served by the bench's git server; its clone URL and secret."""
    from cicd import projects

    clone_url = stack.git_server.repo_url(project)
    return clone_url, projects.register(project, clone_url).webhook_secret


def _cache_lines(log: str) -> list[str]:
    """What the build said about its caches and mirror (a figure's explanation)."""
    words = ("Cache", "mirror", "History to depth")
    return [line.strip() for line in log.splitlines() if any(w in line for w in words)]


# --- 7. maven cache ------------------------------------------------------------------------


def _maven_files(ci_yaml: str) -> dict[str, str]:
    dependencies = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in (coordinate.split(":") for coordinate in MAVEN_DEPENDENCIES)
    )
    return {
        "ci.yaml": ci_yaml,
        "pom.xml": POM.format(dependencies=dependencies),
        "src/main/java/dev/opscd/bench/App.java": APP_JAVA,
    }


def _maven_build(
    stack: Stack, client: Any, repo: Any, files: dict[str, str], secret: str,
    server: MavenRepoServer,
) -> dict[str, Any]:  # fmt: skip
    """Commit ``files`` on main, build it; the build and what the Maven repository served."""
    sha = repo.commit(files, message="bench: maven build")
    server.reset()
    build = _build(stack, client, stack.push_body(repo.project_path, repo.clone_url, sha),
                   secret, timeout=600)  # fmt: skip
    log = build.pop("log")
    if "BUILD SUCCESS" not in log:
        raise RuntimeError(f"build {build['task_id']} did not run Maven:\n{log[-4000:]}")
    served = server.counts()
    served["declared_jars"] = _declared_jars(server.jars())
    return {**build, "served": served, "cache_log": _cache_lines(log)}


def _declared_jars(paths: list[str]) -> int:
    """How many of the declared dependencies' own jars were among the jars served (the rest
    are what they and Maven's plugins need)."""
    served = {path.lstrip("/") for path in paths}
    found = 0
    for coordinate in MAVEN_DEPENDENCIES:
        group, artifact, version = coordinate.split(":")
        path = f"{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.jar"
        found += path in served
    return found


def _maven_run(
    stack: Stack, client: Any, variant: str, run: int, server: MavenRepoServer
) -> dict[str, Any]:
    """A new project (no cache yet): a cold build, then a warm one of a new commit."""
    from tests.support.git import GitRepo

    repo = GitRepo.create(stack.git_server.root, f"bench/maven-{variant}-{run}")
    repo.clone_url, secret = _register(stack, repo.project_path)
    files = _maven_files(CI_YAML[variant])
    cold = _maven_build(stack, client, repo, files, secret, server)
    warm = _maven_build(stack, client, repo, {"README.md": "second push\n"}, secret, server)
    return {
        "cold": cold,
        "warm": warm,
        "speedup": round(cold["duration_s"] / warm["duration_s"], 3),
        "build_stage_speedup": round(cold["stage_s"]["build"] / warm["stage_s"]["build"], 3),
    }


def _maven_agent_env(stack: Stack, podman: Any, settings: Path) -> dict[str, str]:
    """A docker-executor agent on podman (as tests/test_docker.py's), network host so its
    containers reach the Maven repository on 127.0.0.1, with a cache folder of its own."""
    from tests.support.containers import HOST_TOOL_MOUNTS

    return {
        "CICD_EXECUTOR": "docker",
        "CICD_DOCKER_HOST": podman.docker_host,
        "CICD_DOCKER_NETWORK": "host",  # loopback only: never podman's bridge
        "CICD_DOCKER_PULL": "never",  # nothing can be pulled here
        "CICD_DOCKER_VOLUMES": ",".join(HOST_TOOL_MOUNTS),
        "CICD_MAVEN_SETTINGS": str(settings),
        "CICD_IMAGE_JAVA": HOSTTOOLS_IMAGE,
        "CICD_CACHE_DIR": str(stack.tmp / "cache-maven"),
    }


def maven_cache(stack: Stack, plan: Plan) -> dict[str, Any]:
    """Cold and warm builds of the Maven project, ``plan.runs`` times per way of caching."""
    from cicd.web import create_app
    from tests.support.containers import PodmanService, make_host_tools_image
    from tests.support.git import GitRepo

    if shutil.which("podman") is None or shutil.which("mvn") is None:
        raise SystemExit("the maven_cache scenario needs podman and maven: run ./scripts/test once")
    stack.stop_nodes()  # only this scenario's agent takes builds now
    client = create_app(stack.settings).test_client()
    server = MavenRepoServer().start()
    podman = PodmanService(stack.tmp / "podman", [])
    try:
        podman.start()
        make_host_tools_image(podman, HOSTTOOLS_IMAGE)
        settings = stack.tmp / "maven-settings.xml"
        settings.write_text(MAVEN_SETTINGS.format(url=server.url))
        env = _maven_agent_env(stack, podman, settings)
        stack.nodes("maven", processes.WORKER_APP, 1, env)
        # Warm-up: the node's first build and podman's first container are not the cold
        # build's cost.
        warm_up = GitRepo.create(stack.git_server.root, "bench/maven-warm-up")
        warm_up.clone_url, secret = _register(stack, warm_up.project_path)
        sha = warm_up.commit({"ci.yaml": WARM_UP_CI})
        _build(stack, client, stack.push_body(warm_up.project_path, warm_up.clone_url, sha),
               secret, timeout=300)  # fmt: skip
        variants: dict[str, Any] = {}
        for variant in CI_YAML:
            runs = [_maven_run(stack, client, variant, run, server) for run in range(plan.runs)]
            variants[variant] = {
                "ci_yaml": CI_YAML[variant],
                "runs": runs,
                "summary": _maven_summary(runs),
            }
        return {
            "dependencies": len(MAVEN_DEPENDENCIES),
            "repository": str(server.root),
            "variants": variants,
        }
    finally:
        stack.stop_nodes()
        podman.stop()
        server.stop()


def _maven_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of each figure over the runs, cold and warm."""
    summary: dict[str, Any] = {}
    for when in ("cold", "warm"):
        builds = [run[when] for run in runs]
        summary[f"{when}_duration_s"] = spread([b["duration_s"] for b in builds])
        summary[f"{when}_build_stage_s"] = spread([b["stage_s"]["build"] for b in builds])
        for what in ("requests", "jar", "pom", "declared_jars"):
            summary[f"{when}_{what}"] = spread([b["served"][what] for b in builds], 0)
    summary["speedup"] = spread([run["speedup"] for run in runs])
    summary["build_stage_speedup"] = spread([run["build_stage_speedup"] for run in runs])
    return summary


# --- 8. history: warm checkouts ------------------------------------------------------------

# Files the commits take turns rewriting: the history is large, the head's tree is not (as
# in most long-lived repositories), so what a warm build must fetch is the new commit.
HISTORY_FILES = 8
HISTORY_CI = "clone:\n  depth: full\nbuild:\n  script: echo commits $(git rev-list --count HEAD)\n"


def _git(*args: str, input: bytes | None = None) -> str:
    from tests.support.git import git_env

    done = subprocess.run(["git", *args], input=input, env=git_env(), capture_output=True,
                          check=True)  # fmt: skip
    return done.stdout.decode().strip()


def _append_commits(bare: Path, count: int, blob_bytes: int, first: int) -> str:
    """Write ``count`` commits on ``main`` with ``git fast-import``, each rewriting one file
    with ``blob_bytes`` random (incompressible) bytes; the new head."""
    parent = _git("-C", str(bare), "rev-parse", "--verify", "-q", "refs/heads/main^{commit}") \
        if first else ""  # fmt: skip
    stream = bytearray()
    for index in range(first, first + count):
        message = f"bench: history commit {index}\n".encode()
        stream += b"commit refs/heads/main\n"
        stream += f"committer Bench <bench@example.com> {1_700_000_000 + index} +0000\n".encode()
        stream += b"data %d\n%s\n" % (len(message), message)
        if index == first and parent:
            stream += f"from {parent}\n".encode()
        if index == 0:
            stream += b"M 100644 inline ci.yaml\ndata %d\n%s\n" % (
                len(HISTORY_CI),
                HISTORY_CI.encode(),
            )
        name = f"data/{index % HISTORY_FILES:02d}.bin".encode()
        stream += b"M 100644 inline %s\ndata %d\n" % (name, blob_bytes)
        stream += os.urandom(blob_bytes) + b"\n"
    _git("-C", str(bare), "fast-import", "--quiet", input=bytes(stream))
    return _git("-C", str(bare), "rev-parse", "refs/heads/main")


def make_history_repo(root: Path, project: str, commits: int, blob_bytes: int) -> dict[str, Any]:
    """The bare repository ``root/<project>.git`` of ``commits`` commits, packed as a forge
    keeps it (one pack with a bitmap); its head and its pack's size."""
    bare = root / f"{project}.git"
    bare.parent.mkdir(parents=True, exist_ok=True)
    _git("init", "-q", "--bare", "--initial-branch=main", str(bare))
    began = time.monotonic()
    head = _append_commits(bare, commits, blob_bytes, 0)
    _git("-C", str(bare), "repack", "-a", "-d", "-b", "-q")
    pack_bytes = sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))
    return {
        "bare": bare,
        "head": head,
        "commits": commits,
        "pack_bytes": pack_bytes,
        "made_in_s": round(time.monotonic() - began, 1),
    }


def _history_build(
    stack: Stack, client: Any, project: str, clone_url: str, sha: str, secret: str,
    commits: int,
) -> dict[str, Any]:  # fmt: skip
    """Build ``sha``; the bytes the git server sent meanwhile and the clone stage's time."""
    sent = stack.git_server.sent()
    build = _build(stack, client, stack.push_body(project, clone_url, sha), secret, timeout=600)
    served = stack.git_server.sent() - sent
    log = build.pop("log")
    if not re.search(rf"^commits {commits}$", log, re.MULTILINE):
        raise RuntimeError(f"build {build['task_id']} did not see {commits} commits:\n{log}")
    return {
        **build,
        "bytes_served": served,
        "clone_s": build["stage_s"]["clone"],
        "from_mirror": "copied from this agent's mirror" in log,
        "cache_log": _cache_lines(log),
    }


def history(stack: Stack, plan: Plan) -> dict[str, Any]:
    """Per run: an empty cache folder, a cold full-history build, one new commit, a warm one."""
    from cicd.web import create_app

    stack.stop_nodes()
    client = create_app(stack.settings).test_client()
    project = "bench/history"
    repo = make_history_repo(stack.git_server.root, project, plan.history_commits,
                             plan.history_blob_bytes)  # fmt: skip
    clone_url, secret = _register(stack, project)
    cache = stack.tmp / "cache-history"
    stack.nodes("history", processes.WORKER_APP, 1, {"CICD_CACHE_DIR": str(cache)})
    _build(stack, client, stack.payload("main"), stack.secret, timeout=120)  # warm-up, depth 1
    commits, head = repo["commits"], repo["head"]
    runs = []
    try:
        for _ in range(plan.runs):
            shutil.rmtree(cache, ignore_errors=True)  # cold: no mirror on the agent
            cold = _history_build(stack, client, project, clone_url, head, secret, commits)
            head = _append_commits(repo["bare"], 1, plan.history_blob_bytes, commits)
            commits += 1
            warm = _history_build(stack, client, project, clone_url, head, secret, commits)
            runs.append({
                "cold": cold,
                "warm": warm,
                "bytes_ratio": round(warm["bytes_served"] / cold["bytes_served"], 5),
                "clone_speedup": round(cold["clone_s"] / warm["clone_s"], 3),
            })  # fmt: skip
    finally:
        stack.stop_nodes()
    return {
        "commits": repo["commits"],
        "pack_bytes": repo["pack_bytes"],
        "made_in_s": repo["made_in_s"],
        "blob_bytes": plan.history_blob_bytes,
        "files": HISTORY_FILES,
        "runs": runs,
        "summary": {
            **{
                f"{when}_{key}": spread([run[when][key] for run in runs])
                for when in ("cold", "warm")
                for key in ("bytes_served", "clone_s", "duration_s")
            },
            "bytes_ratio": spread([run["bytes_ratio"] for run in runs], 5),
            "clone_speedup": spread([run["clone_speedup"] for run in runs]),
        },
    }
