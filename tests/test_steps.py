"""Pipelines of steps, tried from outside: ci.yaml ``steps:`` pushed to a git server, the
webhook sent to gunicorn, the build run by real worker nodes (shell executor), and what a
user sees read back through the API, the log endpoint and ``cicd logs``.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
import requests
from conftest import ROOT, change, gitlab_payload, post_gitlab, task_log, wait_for_task
from test_trust import new_repo

pytestmark = pytest.mark.usefixtures("workers")

GRAPH = """\
steps:
  - name: lint
    commands: [echo linting, sleep 2, echo linted]
  - name: unit
    commands:
      - echo testing in $(basename "$PWD")
      - sleep 2
    directory: src
  - name: package
    depends_on: [lint, unit]
    environment:
      VERSION: 3.10
    commands: ['echo "packaged $VERSION"']
"""


def push(web: str, repo, files: dict[str, str], branch: str = "main", before: str | None = None):
    sha = repo.commit(files, branch=branch)
    payload = gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha, before)
    answer = post_gitlab(web, payload)
    assert answer.status_code == 202, answer.text
    return answer.json()["task_id"]


def task(web: str, task_id: int) -> dict:
    return requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()


def when(value: str | None) -> dt.datetime:
    return dt.datetime.fromisoformat(value.removesuffix("Z"))


def test_independent_steps_run_at_once_and_the_dependent_one_after_both(web, git_server):
    repo = new_repo(git_server, "steps")
    task_id = push(web, repo, {"ci.yaml": GRAPH, "src/keep": ""})
    done = wait_for_task(web, task_id)
    log = task_log(web, task_id)
    assert done["state"] == "success", log
    steps = task(web, task_id)["steps"]
    assert [s["name"] for s in steps] == ["lint", "unit", "package"]  # file order
    assert {s["state"] for s in steps} == {"success"} and {s["exit_code"] for s in steps} == {0}
    lint, unit, package = steps
    assert when(lint["started_at"]) < when(unit["finished_at"])  # the two overlap
    assert when(unit["started_at"]) < when(lint["finished_at"])
    assert when(package["started_at"]) >= max(when(lint["finished_at"]),
                                              when(unit["finished_at"]))  # fmt: skip
    assert all(s["node"] == done["worker"] for s in steps)
    assert "testing in src" in log and "packaged 3.10" in log
    # Each step's section on its own.
    section = requests.get(f"{web}/api/tasks/{task_id}/log", params={"step": "unit"}, timeout=10)
    assert section.status_code == 200
    assert "testing in src" in section.text and "linting" not in section.text
    assert "── step unit" in section.text
    missing = requests.get(f"{web}/api/tasks/{task_id}/log", params={"step": "nope"}, timeout=10)
    assert missing.status_code == 404 and "no step 'nope'" in missing.json()["error"]
    printed = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "logs", str(task_id), "--step", "lint"],
        env={"CICD_API_URL": web, "PATH": "/usr/bin:/bin"}, cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert "linted" in printed.stdout and "packaged" not in printed.stdout
    metrics = requests.get(f"{web}/metrics", timeout=10).text
    assert 'opscd_steps{state="success"}' in metrics


FAILING = """\
steps:
  - name: compile
    commands: [echo compiling]
  - name: test
    commands: [echo testing, exit 3]
  - name: flaky
    commands: [exit 5]
    failure: ignore
  - name: deploy
    commands: [echo deploying]
  - name: notify
    commands: [echo the build failed]
    when:
      status: failure
"""


def test_a_failing_step_stops_the_rest_and_a_failure_step_still_runs(web, git_server):
    repo = new_repo(git_server, "steps")
    task_id = push(web, repo, {"ci.yaml": FAILING})
    done = wait_for_task(web, task_id)
    log = task_log(web, task_id)
    assert done["state"] == "failed" and done["exit_code"] == 3, log
    steps = {s["name"]: s for s in task(web, task_id)["steps"]}
    assert steps["compile"]["state"] == "success"
    assert (steps["test"]["state"], steps["test"]["exit_code"]) == ("failed", 3)
    assert steps["flaky"]["state"] == "skipped" and steps["deploy"]["state"] == "skipped"
    assert "failed" in steps["deploy"]["reason"]
    assert steps["notify"]["state"] == "success" and "the build failed" in log
    assert "deploying" not in log


def test_an_ignored_failure_does_not_fail_the_build(web, git_server):
    repo = new_repo(git_server, "steps")
    ci = "steps:\n  - name: flaky\n    commands: [exit 5]\n    failure: ignore\n" \
         "  - name: after\n    commands: [echo still here]\n"  # fmt: skip
    task_id = push(web, repo, {"ci.yaml": ci})
    done = wait_for_task(web, task_id)
    assert done["state"] == "success", task_log(web, task_id)
    flaky, after = task(web, task_id)["steps"]
    assert (flaky["state"], flaky["exit_code"]) == ("failed", 5)
    assert "ignored" in flaky["reason"] and after["state"] == "success"


CONDITIONS = """\
steps:
  - name: always
    commands: [echo always]
  - name: release-only
    commands: [echo releasing]
    when:
      branch: release/*
  - name: docs
    commands: [echo building docs]
    when:
      - path: docs/**
  - name: code
    commands: [echo building code]
    when:
      path:
        include: ['src/**']
        exclude: ['**/*.md']
"""


def test_when_branch_and_path_skip_steps_with_a_reason(web, git_server):
    repo = new_repo(git_server, "steps")
    first = repo.commit({"ci.yaml": CONDITIONS, "src/a.py": "1\n", "docs/x.md": "x\n"})
    wait_for_task(web, push(web, repo, {"README": "first"}))  # a new branch: runs everything
    # A push that changes only docs and a Markdown file under src.
    task_id = push(web, repo, {"docs/y.md": "y\n", "src/notes.md": "n\n"}, before=repo.head())
    done = wait_for_task(web, task_id)
    log = task_log(web, task_id)
    assert done["state"] == "success", log
    steps = {s["name"]: s for s in task(web, task_id)["steps"]}
    assert steps["always"]["state"] == "success"
    assert steps["release-only"]["state"] == "skipped"
    assert "release/*" in steps["release-only"]["reason"]
    assert steps["docs"]["state"] == "success"
    assert steps["code"]["state"] == "skipped" and "src/**" in steps["code"]["reason"]
    assert first  # the history the diff is made against


def test_a_graph_error_fails_the_build_naming_the_line(web, git_server):
    repo = new_repo(git_server, "steps")
    ci = ("steps:\n  - name: a\n    commands: [echo a]\n    depends_on: [b]\n"
          "  - name: b\n    commands: [echo b]\n    depends_on: [a]\n")  # fmt: skip
    task_id = push(web, repo, {"ci.yaml": ci})
    done = wait_for_task(web, task_id)
    log = task_log(web, task_id)
    assert done["state"] == "failed"
    assert "ci.yaml line 4: steps.depends_on: a cycle: a → b → a" in log


def test_services_need_the_docker_executor_and_say_so(web, git_server):
    repo = new_repo(git_server, "steps")
    ci = "services:\n  - name: db\n    image: mariadb\n"
    ci += "steps:\n  - name: a\n    commands: [echo hi]\n"
    task_id = push(web, repo, {"ci.yaml": ci})
    done = wait_for_task(web, task_id)
    assert done["state"] == "failed" and "echo hi" not in task_log(web, task_id)
    assert "ci.yaml's services need the docker executor" in done["error"]


def test_a_retry_from_the_failed_step_reuses_the_steps_that_succeeded(web, git_server, tmp_path):
    repo = new_repo(git_server, "steps")
    flag = tmp_path / "second-try"
    ci = f"""\
steps:
  - name: prepare
    commands: [echo prepared in $CI_TASK_ID]
  - name: flaky
    commands: ['if [ -e {flag} ]; then echo passed; else touch {flag}; exit 7; fi']
  - name: after
    commands: [echo after in $CI_TASK_ID]
"""
    first = push(web, repo, {"ci.yaml": ci})
    assert wait_for_task(web, first)["exit_code"] == 7
    url = f"{web}/api/tasks/{first}/retry"
    assert change("post", url, params={"from": "everything"}, timeout=10).status_code == 400
    answer = change("post", url, params={"from": "failed"}, timeout=10)
    assert answer.status_code == 202, answer.text
    retry = answer.json()
    assert (retry["retry_of"], retry["reuse_steps_of"]) == (first, first)
    done = wait_for_task(web, retry["task_id"])
    log = task_log(web, retry["task_id"])
    assert done["state"] == "success", log
    prepare, flaky, after = task(web, retry["task_id"])["steps"]
    assert prepare["state"] == "skipped" and prepare["reason"].startswith("reused: ")
    assert f"build #{first}" in prepare["reason"] and "prepared" not in log
    assert flaky["state"] == "success" and after["state"] == "success"
    again = change("post", f"{web}/api/tasks/{retry['task_id']}/retry", params={"from": "failed"},
                   timeout=10)  # fmt: skip
    assert again.status_code == 409  # it succeeded: nothing failed to start from


def test_no_more_steps_run_at_once_than_the_step_concurrency(web, git_server):
    """Three steps that could all start at once; CICD_STEP_CONCURRENCY is 2 (the default)."""
    repo = new_repo(git_server, "steps")
    ci = "steps:\n" + "".join(
        f"  - name: s{n}\n    depends_on: []\n    commands: [sleep 2]\n" for n in range(3)
    )
    task_id = push(web, repo, {"ci.yaml": ci})
    assert wait_for_task(web, task_id)["state"] == "success", task_log(web, task_id)
    steps = sorted(task(web, task_id)["steps"], key=lambda s: s["started_at"])
    first, second, third = steps
    assert when(second["started_at"]) < when(first["finished_at"])  # two at once
    assert when(third["started_at"]) >= min(
        when(first["finished_at"]), when(second["finished_at"])
    )  # never three
    assert "at most 2 at once" in task_log(web, task_id)
