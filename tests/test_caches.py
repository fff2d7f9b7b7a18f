"""Dependency caches, tried from outside: builds through the webhook and real worker nodes
that keep directories between builds (``ci.yaml`` ``cache:``), a pushed branch that tries to
poison main's cache, two builds saving one cache at once, an agent whose caches outgrow
``CICD_CACHE_MAX_BYTES``, ``cicd cache list|clear``, and the Java default keeping Maven's
downloads with no configuration (in a container, from an HTTP-less offline mirror).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import pytest
from conftest import (
    ROOT,
    GitRepo,
    change,
    gitlab_payload,
    post_gitlab,
    task_log,
    wait_for_task,
)
from support.containers import HOST_TOOL_MOUNTS, write_maven_settings
from test_docker import hello_maven
from test_trust import new_repo

from cicd.ciyaml import PipelineError, parse_pipeline

MIB = 1024 * 1024

#: Reads what the cache holds, then leaves this build's mark in it.
MARKING = """\
cache:
  paths: [deps]
build:
  script:
    - if [ -f deps/mark ]; then echo "restored mark=$(cat deps/mark)"; else echo "no mark"; fi
    - mkdir -p deps && echo "{mark}" > deps/mark
"""


def build(web: str, repo: GitRepo, files: dict[str, str], branch: str = "main") -> tuple[dict, str]:
    sha = repo.commit(files, branch=branch)
    answer = post_gitlab(web, gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha))
    assert answer.status_code == 202, answer.text
    task = wait_for_task(web, answer.json()["task_id"], timeout=120)
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    return task, log


def caches(web: str, project: str) -> list[dict]:
    answer = change("get", f"{web}/api/projects/{project}/caches", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["caches"]


def cli(web: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cicd.cli", *args, "--url", web],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- ci.yaml ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ("[]", "cache: must list one or more directories of the repository, such as "
               "[.m2/repository] (false keeps nothing), not an empty list"),
        ("[/root/.m2]", "cache[0]: must be relative to the repository root"),
        ("[../outside]", 'cache[0]: must stay inside the repository: ".." is not allowed'),
        ("[.]", "cache[0]: must name a directory inside the repository"),
        ("{paths: [a, a/b]}", 'cache: "a/b" is inside "a": list it once'),
        ("{key: deps}", "cache.paths: this field is required"),
        ("{paths: [a], keys: x}", "cache.keys: unknown field (did you mean key?)"),
        ("3", "cache: must be a list of directories, a mapping {paths, key} or false"),
    ],
)  # fmt: skip
def test_a_wrong_cache_section_says_what_is_wrong(cache: str, message: str) -> None:
    with pytest.raises(PipelineError) as raised:
        parse_pipeline(f"cache: {cache}\nbuild:\n  script: make\n")
    assert f"ci.yaml line 1: {message}" in str(raised.value)


def test_cache_paths_are_stored_one_way() -> None:
    pipeline = parse_pipeline("cache: {paths: [./node_modules/, .m2//repository], key: deps}\n"
                              "build: {script: make}\n")  # fmt: skip
    assert pipeline.cache.paths == ("node_modules", ".m2/repository")
    assert pipeline.cache.key == "deps"
    assert not parse_pipeline("cache: false\nbuild: {script: make}\n").cache.enabled


# --- builds ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("workers")
def test_a_second_build_restores_what_the_first_saved_and_clear_empties_it(web, git_server):
    repo = new_repo(git_server, "caches")
    _, log = build(web, repo, {"ci.yaml": MARKING.format(mark="first")})
    assert "no mark" in log
    assert 'Cache (ci.yaml cache:): none yet for key "main"' in log
    assert 'Cache saved: key "main", deps' in log
    first = caches(web, repo.project_path)
    assert [(row["key"], row["size_bytes"] > 0) for row in first] == [("main", True)]

    task, log = build(web, repo, {"ci.yaml": MARKING.format(mark="second")})
    assert "restored mark=first" in log
    assert 'Cache restored (ci.yaml cache:): key "main", deps' in log
    [row] = caches(web, repo.project_path)
    assert row["task_id"] == task["task_id"]  # saved again, by the second build
    listed = cli(web, "cache", "list", repo.project_path)
    assert listed.splitlines()[0].split() == ["KEY", "SIZE", "NODE", "BUILD", "SAVED", "USED"]
    assert listed.splitlines()[1].split()[0] == "main"

    assert "cleared 1 cache(s)" in cli(web, "cache", "clear", repo.project_path)
    assert caches(web, repo.project_path) == []
    _, log = build(web, repo, {"ci.yaml": MARKING.format(mark="third")})
    assert "no mark" in log  # cleared on the agent too, not just in the listing


@pytest.mark.usefixtures("workers")
def test_an_unprotected_branch_reads_mains_cache_but_cannot_change_it(web, git_server):
    repo = new_repo(git_server, "caches")
    build(web, repo, {"ci.yaml": MARKING.format(mark="from main")})

    _, log = build(web, repo, {"ci.yaml": MARKING.format(mark="poison")}, branch="feature/x")
    assert "restored mark=from main" in log  # its own key has none: main's is read
    assert "Cache not saved: feature/x is not a protected ref of this project" in log
    # An explicit key is no way around it either.
    keyed = MARKING.replace("paths: [deps]", "paths: [deps]\n  key: main")
    _, log = build(web, repo, {"ci.yaml": keyed.format(mark="poison")}, branch="feature/x")
    assert "Cache not saved" in log

    _, log = build(web, repo, {"ci.yaml": MARKING.format(mark="main again")})
    assert "restored mark=from main" in log and "poison" not in log
    assert [row["key"] for row in caches(web, repo.project_path)] == ["main"]


@pytest.mark.usefixtures("workers")
def test_a_restore_never_writes_outside_the_checkout(web, git_server, tmp_path):
    """A branch whose repository makes the cache directory a symlink out of the checkout
    gets nothing restored through it, and its build goes on."""
    repo = new_repo(git_server, "caches")
    build(web, repo, {"ci.yaml": MARKING.format(mark="from main")})
    outside = tmp_path / "outside"
    outside.mkdir()
    repo.commit({"side.txt": "x"}, branch="feature/link")
    (repo.work_path / "deps").symlink_to(outside, target_is_directory=True)
    reading = ("cache: [deps]\nbuild:\n  script:\n"
               "    - if [ -f deps/mark ]; then echo MARK-''THROUGH-LINK; fi\n")  # fmt: skip
    _, log = build(web, repo, {"ci.yaml": reading}, branch="feature/link")
    assert "MARK-THROUGH-LINK" not in log
    assert "of its entries left out, as they would land outside the checkout" in log
    assert list(outside.iterdir()) == []  # nothing was written through the link


#: Each build checks that what it restored is one build's whole cache (every file has the
#: mark of the manifest), then writes a cache of its own: 40 files of 256 KiB.
CONSISTENT = """\
cache:
  paths: [deps]
  key: shared
build:
  script:
    - |
      if [ -f deps/manifest ]; then
        mark=$(cat deps/manifest); count=0
        for f in deps/part-*; do
          [ "$(head -c 32 "$f")" = "$mark" ] || { echo "MIXED CACHE in $f"; exit 1; }
          count=$((count + 1))
        done
        [ "$count" = 40 ] || { echo "PARTIAL CACHE: $count files"; exit 1; }
        echo "restored a whole cache of $mark"
      fi
    - rm -rf deps && mkdir deps
    - |
      mark=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')
      for i in $(seq 1 40); do
        { printf %s "$mark"; head -c 262144 /dev/urandom; } > deps/part-$i
      done
      echo "$mark" > deps/manifest
"""


@pytest.mark.usefixtures("workers")
def test_concurrent_builds_of_one_project_both_succeed_with_a_consistent_cache(web, git_server):
    repo = new_repo(git_server, "caches")
    build(web, repo, {"ci.yaml": CONSISTENT})
    project = repo.project_path
    answer = change("patch", f"{web}/api/projects/{project}", json={"protected": "main,release/*"},
                    timeout=10)  # fmt: skip
    assert answer.status_code == 200, answer.text

    # Two protected branches build at once on the two nodes; both restore, both save.
    results: dict[str, tuple[dict, str]] = {}
    shas = {branch: repo.commit({"b.txt": branch}, branch=branch)
            for branch in ("main", "release/1")}  # fmt: skip
    answers = {branch: post_gitlab(web, gitlab_payload("push-event.json", repo,
                                                       f"refs/heads/{branch}", sha))
               for branch, sha in shas.items()}  # fmt: skip

    def wait(branch: str) -> None:
        task = wait_for_task(web, answers[branch].json()["task_id"], timeout=120)
        results[branch] = task, task_log(web, task["task_id"])

    threads = [threading.Thread(target=wait, args=(branch,)) for branch in answers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for task, log in results.values():
        assert task["state"] == "success", log
        assert "restored a whole cache of" in log and 'Cache saved: key "shared"' in log

    _, log = build(web, repo, {"c.txt": "after both"})
    assert "restored a whole cache of" in log  # one build's whole cache, never a mix
    assert len(caches(web, project)) == 1


def test_eviction_keeps_the_total_under_the_bound(start_stack, git_server, tmp_path):
    store = tmp_path / "cache"
    stack = start_stack("caches-evict", CICD_CACHE_DIR=str(store),
                        CICD_CACHE_MAX_BYTES=str(3 * MIB))  # fmt: skip
    script = ("cache: [deps]\nbuild:\n  script:\n    - mkdir -p deps\n"
              "    - head -c {size} /dev/urandom > deps/blob-$CI_COMMIT_SHA\n")  # fmt: skip
    one_mib = script.format(size=MIB)
    first, second, third = (new_repo(git_server, "caches") for _ in range(3))
    build(stack.web, first, {"ci.yaml": one_mib})
    build(stack.web, second, {"ci.yaml": one_mib})
    # The first project is used again (its cache restored and saved anew): the second is
    # now the least recently used, and goes when the third's cache does not fit.
    _, log = build(stack.web, first, {"ci.yaml": script.format(size=MIB // 4)})
    assert "Cache restored" in log
    _, log = build(stack.web, third, {"ci.yaml": one_mib})
    assert "1 older cache(s) removed to stay under the bound" in log

    files = list((store / "deps").glob("*.tar"))
    assert sum(path.stat().st_size for path in files) <= 3 * MIB
    assert len(files) == 2
    assert caches(stack.web, second.project_path) == []
    assert len(caches(stack.web, first.project_path)) == 1
    assert len(caches(stack.web, third.project_path)) == 1

    # A cache bigger than the bound is not kept at all; the build still succeeds.
    huge = new_repo(git_server, "caches")
    _, log = build(stack.web, huge, {"ci.yaml": script.format(size=4 * MIB)})
    assert "Cache not saved: 4.0 MiB is more than CICD_CACHE_MAX_BYTES (3.0 MiB)" in log
    assert caches(stack.web, huge.project_path) == []


def test_the_java_default_keeps_mavens_downloads_with_no_configuration(
    start_stack, docker_env, git_server, busybox_image, tmp_path
):
    """``build: {language: java}`` alone: the second build restores ``.m2/repository`` and
    downloads nothing, and the image is built without it; an agent whose settings.xml names
    its own localRepository is left to it (tests/test_docker.py)."""
    settings = write_maven_settings(tmp_path / "settings.xml", None)  # no localRepository
    stack = start_stack("caches-java", **{**docker_env, "CICD_MAVEN_SETTINGS": str(settings),
                        "CICD_DOCKER_VOLUMES": ",".join(HOST_TOOL_MOUNTS),
                        "CICD_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
    files = hello_maven()
    files["ci.yaml"] = "build:\n  language: java\npublish: true\n"
    # The image build's context is the checkout: Maven's cache must not be in it.
    files["Dockerfile"] = (
        f"FROM {busybox_image}\nCOPY . /ctx\nRUN if [ -d /ctx/.m2 ]; then exit 1; fi\n"
    )
    repo = GitRepo.create(git_server.root, f"caches/maven-{uuid.uuid4().hex[:6]}")
    repo.clone_url = git_server.repo_url(repo.project_path)

    _, cold = build(stack.web, repo, files)
    assert "BUILD SUCCESS" in cold
    assert "Downloaded from debian" in cold
    assert 'Cache saved: key "main", .m2/repository' in cold
    _, warm = build(stack.web, repo, {"README": "warm\n"})
    assert "BUILD SUCCESS" in warm
    assert 'Cache restored (the java default): key "main", .m2/repository' in warm
    assert "Downloaded from" not in warm and "Downloading from" not in warm
    assert 'Cache unchanged since it was restored: key "main" kept as it is' in warm
