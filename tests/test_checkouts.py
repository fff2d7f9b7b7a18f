"""Warm checkouts, tried from outside: builds that ask for history (``clone: {depth: …}``)
through the webhook and real worker nodes, against a git server whose repository is
force-pushed, and an agent mirror that is corrupted or deleted between builds.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import gitlab_payload, post_gitlab, task_log, wait_for_task
from test_trust import new_repo

pytestmark = pytest.mark.usefixtures("workers")

FULL = "clone:\n  depth: full\nbuild:\n  script:\n    - echo commits $(git rev-list --count HEAD)\n"


def build(web: str, repo, files: dict[str, str], **commit) -> tuple[dict, str]:
    sha = repo.commit(files, **commit)
    answer = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha))
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"])
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    assert task["commit_sha"] == sha
    return task, log


def mirror_of(opscd_env: dict[str, str], repo) -> Path:
    digest = hashlib.sha256(repo.clone_url.encode()).hexdigest()[:32]
    return Path(opscd_env["CICD_CACHE_DIR"]) / "git" / f"{digest}.git"


def test_a_full_history_build_fetches_from_the_mirror_and_survives_a_force_push(
    web, git_server, opscd_env
):
    repo = new_repo(git_server, "history")
    for n in range(4):
        repo.commit({"n.txt": f"{n}\n"})
    _, log = build(web, repo, {"ci.yaml": FULL})
    assert "commits 5" in log and "copied from this agent's mirror" in log
    assert mirror_of(opscd_env, repo).is_dir()
    _, log = build(web, repo, {"n.txt": "warm\n"})
    assert "commits 6" in log and "copied from this agent's mirror" in log

    # History rewritten: a new root, force-pushed over main.
    repo._work("checkout", "--quiet", "--orphan", "rewritten")
    repo._work("commit", "--quiet", "--allow-empty", "-m", "new root")
    repo._work("branch", "--quiet", "-D", "main")
    repo._work("branch", "--quiet", "-m", "main")
    _, log = build(web, repo, {"ci.yaml": FULL, "fresh.txt": "x\n"})
    assert "commits 2" in log


def test_a_numbered_depth_gives_that_many_commits(web, git_server):
    repo = new_repo(git_server, "history")
    for n in range(5):
        repo.commit({"n.txt": f"{n}\n"})
    ci = "clone:\n  depth: 3\nbuild:\n  script:\n    - echo commits $(git rev-list --count HEAD)\n"
    _, log = build(web, repo, {"ci.yaml": ci})
    assert "commits 3" in log


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_broken_mirror_is_made_again_and_never_fails_a_build(web, git_server, opscd_env, damage):
    repo = new_repo(git_server, "history")
    repo.commit({"a.txt": "a\n"})
    build(web, repo, {"ci.yaml": FULL})
    mirror = mirror_of(opscd_env, repo)
    if damage == "deleted":
        shutil.rmtree(mirror)
    else:  # every object file garbled
        for path in (mirror / "objects").rglob("*"):
            if path.is_file():
                path.chmod(0o644)
                path.write_bytes(b"garbage")
    _, log = build(web, repo, {"b.txt": "b\n"})
    assert "commits 3" in log
    if damage == "corrupted":
        assert "mirror of the repository was unusable; making it again" in log
    assert (mirror / "HEAD").is_file()
