"""The README's commands as a new user runs them, and the Procfile under honcho.

The quickstart runs in a fresh copy of the project and a fresh virtual
environment, exactly as written in the README; it must come up, build the
sample repository, and leave no process and no listening port behind after
Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import (
    ROOT,
    GitRepo,
    gitlab_payload,
    post_gitlab,
    task_log,
    wait_for_task,
    wait_until,
)
from support.processes import port_open

README = (ROOT / "README.md").read_text()


def readme_command(after: str) -> str:
    """The first ``sh`` code block after the text ``after`` in the README."""
    block = re.search(re.escape(after) + r".*?```sh\n(.*?)\n```", README, re.S)
    assert block, f"no command after {after!r} in the README"
    return block.group(1).strip()


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """The project as a user clones it: committed and untracked files, no .venv."""
    target = tmp_path / "opscd"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(target)], check=True)
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--others", "--modified", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):  # work not committed yet is tested too
        source, destination = ROOT / name, target / name
        if source.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(source.read_bytes())
    return target


def test_readme_quickstart_runs_as_written(project_copy: Path):
    for port in (8000, 5555):
        assert not port_open(port), f"port {port} is taken: the quickstart needs it"
    run_it = readme_command("**Run it**")
    assert run_it.startswith("python3 -m venv .venv && .venv/bin/pip install .")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CICD_", "VIRTUAL_ENV"))}
    env.pop("DOCKER_HOST", None)
    log = project_copy / "up.log"
    with log.open("wb") as output:
        up = subprocess.Popen(["bash", "-c", run_it], cwd=project_copy, env=env, stdout=output,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_until(
            lambda: "OpsCD is up." in log.read_text(errors="replace") or up.poll() is not None,
            600,
            "cicd up (after pip install)",
            interval=1,
        )
        assert up.poll() is None, log.read_text(errors="replace")[-5000:]
        trigger = readme_command("A build from end to end")
        result = subprocess.run(["bash", "-c", trigger], cwd=project_copy, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Hello from OpsCD, building local/hello" in result.stdout
        assert "Registered local/hello on first use" in result.stdout
        tasks = requests.get("http://127.0.0.1:8000/api/tasks", timeout=5).json()["tasks"]
        assert tasks[0]["state"] == "success" and tasks[0]["project"] == "local/hello"
        # Again: served on another port, the registration follows; nothing to set up.
        again = subprocess.run(["bash", "-c", trigger], cwd=project_copy, env=env,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Registered" not in again.stdout
        shown = requests.get("http://127.0.0.1:8000/api/projects/local/hello", timeout=5).json()
        assert shown["clone_url"] in again.stdout  # "Serving hello at <its URL>"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)  # Ctrl-C
        up.wait(60)
    text = log.read_text(errors="replace")
    assert "Stopping OpsCD" in text
    wait_until(lambda: not processes_mentioning(str(project_copy)), 10, "no process left")
    assert not port_open(8000) and not port_open(5555)
    assert not (project_copy / ".opscd" / "redis.sock").exists()


@pytest.mark.parametrize(("example", "status", "expected"), [
    ("hello", 0, "This file was cloned over HTTP by an OpsCD worker."),
    ("failing", 3, "about to fail"),
])  # fmt: skip
def test_cicd_run_exits_with_the_build_status(example: str, status: int, expected: str):
    result = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "run", str(ROOT / "examples" / example),
         "--executor", "shell"],
        env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == status, result.stdout + result.stderr
    assert expected in result.stdout
    assert "✓ clone" in result.stderr
    assert ("✓ build" if status == 0 else "✗ build failed") in result.stderr
    assert "publish skipped" in result.stderr or status != 0


def test_honcho_runs_the_procfile_against_mariadb_and_redis(isolated_env, git_server, tmp_path):
    base = next(
        port for port in range(21000, 30000, 300)
        if not any(port_open(port + offset) for offset in (0, 100, 200))
    )  # fmt: skip
    env = {
        **isolated_env("honcho"),
        "CICD_AGENT_NAME": f"honcho{uuid.uuid4().hex[:4]}",
        "CICD_FLOWER_USER": "ops",
        "CICD_FLOWER_PASSWORD": "honcho-flower",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    log = tmp_path / "honcho.log"
    with log.open("wb") as output:
        honcho = subprocess.Popen(
            [sys.executable, "-m", "honcho", "start", "-f", str(ROOT / "Procfile"), "-p", str(base),
             "-e", "/dev/null"], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    web = f"http://127.0.0.1:{base}"
    try:
        wait_until(lambda: port_open(base) and port_open(base + 200), 60, "web and flower")
        wait_until(lambda: " ready." in log.read_text(), 60, "the worker")
        repo = GitRepo.create(git_server.root, f"honcho/app-{uuid.uuid4().hex[:6]}")
        repo.clone_url = git_server.repo_url(repo.project_path)
        sha = repo.commit({"ci.yaml": "build:\n  script: echo built under honcho\n"})
        response = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
        assert response.status_code == 202, response.text
        task = wait_for_task(web, response.json()["task_id"])
        assert task["state"] == "success", log.read_text()[-3000:]
        assert task["worker"].startswith(env["CICD_AGENT_NAME"] + "@")
        assert "built under honcho" in task_log(web, task["task_id"])
        flower = requests.get(f"http://127.0.0.1:{base + 200}/api/workers",
                              auth=("ops", "honcho-flower"), timeout=30)  # fmt: skip
        assert flower.status_code == 200
    finally:
        os.killpg(honcho.pid, signal.SIGINT)
        honcho.wait(60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(port_open(base + o) for o in (0, 200)):
        time.sleep(0.2)
    assert not port_open(base) and not port_open(base + 200)


@pytest.mark.parametrize("taken", ["--port", "--flower-port"])
def test_cicd_up_names_a_taken_port_instead_of_claiming_to_be_up(tmp_path, taken):
    """With its port taken, gunicorn (or Flower) cannot bind: cicd up must not say it is up."""
    import socket

    from support.processes import free_port

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        ports = {"--port": str(free_port()), "--flower-port": str(free_port()), taken: str(busy)}
        result = subprocess.run(
            [sys.executable, "-m", "cicd.cli", "up", *[x for kv in ports.items() for x in kv]],
            env={"PATH": os.environ["PATH"], "CICD_STATE_DIR": str(tmp_path / "state")},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"port {busy}" in result.stderr and taken in result.stderr, result.stderr
    assert "OpsCD is up" not in result.stdout
