"""Builds in containers and images pushed to a registry, as in production.

An agent with ``CICD_EXECUTOR=docker`` on podman's Docker-compatible API, a
distribution registry with htpasswd auth, locally made base images (nothing is
pulled), offline Maven from Debian's plugin repository. Containers use network
``none``.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import docker
import pytest
import requests
from conftest import (
    CHANGE,
    REGISTRY_PASSWORD,
    GitRepo,
    Process,
    change,
    gitlab_payload,
    post_gitlab,
    task_log,
    wait_for_task,
    wait_ready,
    wait_until,
    worker_args,
)
from support.containers import HOST_TOOL_MOUNTS

from workers.executors.docker import _has_ended, _LogCopy

PROJECT = Path(__file__).resolve().parent / "projects" / "hello-maven"
LABEL = "dev.opscd.node"


@pytest.fixture(scope="module")
def agent(start_stack, docker_env):
    """A web process and one docker-executor worker node, ``docker1@<host>``."""
    return start_stack("docker1", **docker_env)


@pytest.fixture
def project(git_server) -> GitRepo:
    repo = GitRepo.create(git_server.root, f"Team/Hello.Maven-{uuid.uuid4().hex[:6]}")
    repo.clone_url = git_server.repo_url(repo.project_path)
    return repo


def hello_maven() -> dict[str, str]:
    return {
        str(path.relative_to(PROJECT)): path.read_text()
        for path in PROJECT.rglob("*")
        if path.is_file() and "target" not in path.parts
    }


def push(web: str, repo: GitRepo, files: dict[str, str], ref: str = "refs/heads/main") -> dict:
    """Commit, send the webhook, wait for the build; return the finished task."""
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    sha = repo.commit(files, message="build me", branch=branch)
    fixture, event = "push-event.json", "Push Hook"
    if ref.startswith("refs/tags/"):
        repo.tag(ref.removeprefix("refs/tags/"), sha)
        fixture, event = "tag-event.json", "Tag Push Hook"
    response = post_gitlab(web, gitlab_payload(fixture, repo, ref, sha), event=event)
    assert response.status_code == 202, response.text
    return wait_for_task(web, response.json()["task_id"], timeout=180)


def build_containers(client: docker.DockerClient) -> list:
    """OpsCD's build containers; one removed while it is listed does not count.

    (podman answers the inspect of a container it just removed with a 500.)
    """
    found = []
    for summary in client.api.containers(all=True, filters={"label": LABEL}):
        try:
            found.append(client.containers.get(summary["Id"]))
        except docker.errors.APIError:  # NotFound included
            continue
    return found


def test_maven_project_is_built_in_a_container_and_its_image_pushed(
    agent, project, registry, docker_client, docker_env
):
    task = push(agent.web, project, hello_maven(), ref="refs/heads/feature/login")
    log = task_log(agent.web, task["task_id"])
    assert task["state"] == "success", log
    assert "with the docker executor in localhost/opscd-hosttools:latest" in log
    assert "BUILD SUCCESS" in log and "Tests run: 3, Failures: 0" in log

    # Pushed as <registry>/<project>:<branch>..<short sha>, the project in lower case.
    repository = f"opscd/{project.project_path.lower()}"
    tag = f"feature__login..{task['commit_sha'][:8]}"
    assert task["image"] == f"{registry.address}/{repository}:{tag}"
    assert tag in registry.tags(repository)
    assert task["image_digest"] == registry.manifest_digest(repository, tag)
    assert [s["state"] for s in task["stages"]] == ["success", "success", "success"]
    assert REGISTRY_PASSWORD not in log

    # settings.xml was used: its localRepository (a host folder here) got the plugins.
    local_repository = Path(docker_env["OPSCD_TEST_MAVEN_REPOSITORY"])
    assert (local_repository / "org/apache/maven/plugins/maven-compiler-plugin").is_dir()

    # Nothing left on the agent: no build container, no local copy of the image.
    assert build_containers(docker_client) == []
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(task["image"])

    # Pull the pushed image with credentials and run it: the program's output.
    image = docker_client.images.pull(
        f"{registry.address}/{repository}", tag=tag, auth_config=registry.auth_config
    )
    try:
        output = docker_client.containers.run(
            image.id, network_mode="none", volumes=HOST_TOOL_MOUNTS, remove=True
        )
        assert output.decode().strip() == "Hello from OpsCD"
    finally:
        docker_client.images.remove(image.id, force=True)


def test_tag_push_is_published_under_the_tag(agent, project, registry):
    task = push(agent.web, project, hello_maven(), ref="refs/tags/v1.2.0")
    assert task["state"] == "success", task_log(agent.web, task["task_id"])
    repository = f"opscd/{project.project_path.lower()}"
    assert task["image"].endswith(f"{repository}:v1.2.0")
    assert "v1.2.0" in registry.tags(repository)


def small_image(busybox_image: str, marker: str) -> dict[str, str]:
    """A ci.yaml that publishes a one-file image of ``marker``: quick to build and push."""
    return {
        "ci.yaml": f"build:\n  image: {busybox_image}\n  script: [echo built]\npublish: true\n",
        "Dockerfile": f"FROM {busybox_image}\nCOPY marker.txt /marker.txt\n",
        "marker.txt": marker,
    }


def test_image_tags_never_collide_and_an_unprotected_tag_overwrites_nothing(
    agent, project, registry, busybox_image
):
    """In the real registry: a git tag named as 0.1 named branch images, and tags that 0.1
    made equal, get images of their own; a tag moved to another commit does not replace
    its image until the project protects it."""
    repository = f"opscd/{project.project_path.lower()}"
    main = push(agent.web, project, small_image(busybox_image, "main"))
    assert main["state"] == "success", task_log(agent.web, main["task_id"])
    branch_tag = f"main..{main['commit_sha'][:8]}"
    assert main["image"].endswith(f"{repository}:{branch_tag}")
    branch_digest = registry.manifest_digest(repository, branch_tag)

    # 0.1 tagged branch main's build of commit C as main-C, and v1/x as v1-x.
    lookalike = f"main-{main['commit_sha'][:8]}"
    for name in (lookalike, "v1/x", "v1-x"):
        task = push(agent.web, project, small_image(busybox_image, name), f"refs/tags/{name}")
        assert task["state"] == "success", task_log(agent.web, task["task_id"])
    assert {branch_tag, lookalike, "v1__x", "v1-x"} <= set(registry.tags(repository))
    assert registry.manifest_digest(repository, branch_tag) == branch_digest
    assert registry.manifest_digest(repository, "v1__x") != registry.manifest_digest(
        repository, "v1-x"
    )

    # Moving unprotected tag v1-x to another commit fails its publish; the image stays.
    first = registry.manifest_digest(repository, "v1-x")
    moved = push(agent.web, project, small_image(busybox_image, "moved"), "refs/tags/v1-x")
    assert moved["state"] == "failed" and moved["stage"] == "publish"
    assert "exists already as another image" in moved["error"]
    assert "protected" in moved["error"]
    assert registry.manifest_digest(repository, "v1-x") == first

    # Once the project protects its tags, a tag build may replace the image.
    changed = change("patch", f"{agent.web}/api/projects/{project.project_path}", timeout=10,
                             json={"protected": "main,refs/tags/v*"})  # fmt: skip
    assert changed.status_code == 200, changed.text
    again = push(agent.web, project, small_image(busybox_image, "again"), "refs/tags/v1-x")
    assert again["state"] == "success", task_log(agent.web, again["task_id"])
    assert registry.manifest_digest(repository, "v1-x") == again["image_digest"] != first


def test_the_image_build_has_the_build_containers_memory_limit(agent, project, busybox_image):
    """The publish stage's image build runs the Dockerfile's RUN steps: they get the memory
    limit of a build container (CICD_DOCKER_MEMORY=1g here), not the host's."""
    files = small_image(busybox_image, "limited")
    files["Dockerfile"] += ("RUN echo limit=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || "
                            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes)\n")  # fmt: skip
    task = push(agent.web, project, files)
    log = task_log(agent.web, task["task_id"])
    assert task["state"] == "success", log
    assert f"limit={1024**3}" in log, log


def test_failing_build_in_a_container(agent, project, busybox_image, docker_client):
    ci = f"build:\n  image: {busybox_image}\n  workdir: /src\n  script:\n    - ls\n    - exit 7\n"
    task = push(agent.web, project, {"ci.yaml": ci, "marker.txt": "x"})
    assert task["state"] == "failed" and task["exit_code"] == 7
    log = task_log(agent.web, task["task_id"])
    assert "marker.txt" in log  # the checkout was mounted at workdir, the working directory
    assert "exited with code 7" in task["error"]
    assert build_containers(docker_client) == []


def test_timeout_kills_the_container(agent, project, busybox_image, docker_client):
    ci = f"build:\n  image: {busybox_image}\n  timeout: 2s\n  script: sleep 300\n"
    task = push(agent.web, project, {"ci.yaml": ci})
    assert task["state"] == "failed"
    assert "timed out after 2s" in task["error"]
    assert task["exit_code"] == 137
    assert build_containers(docker_client) == []


def test_missing_image_fails_clearly(agent, project):
    task = push(agent.web, project, {"ci.yaml": "build:\n  image: localhost/nope:1\n  script: x\n"})
    assert task["state"] == "failed" and task["stage"] == "build"
    assert "image 'localhost/nope:1' is not on this agent" in task["error"]


def test_language_default_builds_a_python_project(agent, project):
    files = {
        "ci.yaml": "build:\n  language: python\n",
        "test_app.py": "import unittest\n\n\nclass T(unittest.TestCase):\n"
        "    def test_ok(self):\n        self.assertEqual(1 + 1, 2)\n",
    }
    task = push(agent.web, project, files)
    log = task_log(agent.web, task["task_id"])
    assert task["state"] == "success", log
    assert "$ python3 -m unittest discover -v" in log
    assert "Ran 1 test" in log and "OK" in log


SERVICE_CI = """\
services:
  - name: web
    image: {image}
    commands:
      - mkdir -p /www
      - echo hello-from-the-service > /www/index.html
      - httpd -f -p 8080 -h /www
steps:
  - name: fetch
    image: {image}
    commands:
      - n=0; until wget -qO- http://web:8080/; do n=$((n+1)); [ $n -lt 20 ]; sleep 0.5; done
  - name: hold
    image: {image}
    commands: ['{hold}']
"""


def test_a_service_is_reachable_from_the_steps_by_its_name_and_removed_after(
    agent, project, busybox_image, docker_client
):
    task = push(agent.web, project, {"ci.yaml": SERVICE_CI.format(image=busybox_image,
                                                                  hold="true")})  # fmt: skip
    log = task_log(agent.web, task["task_id"])
    assert task["state"] == "success", log
    assert "Services web are up" in log and "hello-from-the-service" in log
    assert build_containers(docker_client) == []  # the service went with the build


def test_a_canceled_build_removes_its_services(agent, project, busybox_image, docker_client):
    ci = SERVICE_CI.format(image=busybox_image, hold="sleep 120")
    sha = project.commit({"ci.yaml": ci}, message="hold")
    answer = post_gitlab(agent.web, gitlab_payload("push-event.json", project, "refs/heads/main",
                                                   sha))  # fmt: skip
    task_id = answer.json()["task_id"]
    wait_until(lambda: "$ sleep 120" in task_log(agent.web, task_id), 60, "the hold step")
    assert len(build_containers(docker_client)) == 2  # the service and the step
    assert change("post", f"{agent.web}/api/tasks/{task_id}/cancel", timeout=10).status_code == 200
    wait_until(lambda: build_containers(docker_client) == [], 30, "the containers to go")
    assert wait_for_task(agent.web, task_id)["state"] == "canceled"


def test_independent_steps_run_in_containers_at_the_same_time(agent, project, busybox_image):
    ci = f"""\
steps:
  - name: left
    image: {busybox_image}
    commands: [sleep 2, echo left]
  - name: right
    image: {busybox_image}
    commands: [sleep 2, echo right]
  - name: join
    image: {busybox_image}
    depends_on: [left, right]
    commands: [echo joined]
"""
    task = push(agent.web, project, {"ci.yaml": ci})
    assert task["state"] == "success", task_log(agent.web, task["task_id"])
    left, right, join = requests.get(f"{agent.web}/api/tasks/{task['task_id']}",
                                     timeout=10).json()["steps"]  # fmt: skip
    assert left["started_at"] < right["finished_at"] and right["started_at"] < left["finished_at"]
    assert join["started_at"] >= max(left["finished_at"], right["finished_at"])
    assert {step["image"] for step in (left, right, join)} == {busybox_image}


def test_a_killed_nodes_services_are_removed_when_it_starts_again(
    start_stack, docker_env, project, busybox_image, docker_client, tmp_path
):
    stack = start_stack("svckill", **docker_env)
    ci = SERVICE_CI.format(image=busybox_image, hold="sleep 120")
    sha = project.commit({"ci.yaml": ci}, message="hold")
    answer = post_gitlab(stack.web, gitlab_payload("push-event.json", project, "refs/heads/main",
                                                   sha))  # fmt: skip
    task_id = answer.json()["task_id"]
    wait_until(lambda: "$ sleep 120" in task_log(stack.web, task_id), 60, "the hold step")
    assert len(build_containers(docker_client)) == 2  # the service and the step
    stack.worker.stop(signal.SIGKILL)  # the node dies with its build's containers running
    assert len(build_containers(docker_client)) == 2
    # Canceled meanwhile, so that nobody runs it again; the node comes back.
    assert change("post", f"{stack.web}/api/tasks/{task_id}/cancel", timeout=10).status_code == 200
    again = Process("svckill-again", stack.worker.popen.args, stack.env, tmp_path)
    try:
        wait_ready(again)
        wait_until(lambda: build_containers(docker_client) == [], 30, "the leftovers removed")
    finally:
        again.stop()


GO_MODULE = {
    "go.mod": "module example.com/hello\n\ngo 1.19\n",
    "hello.go": "package hello\n\n// Greeting is what the build checks.\n"
    'func Greeting() string { return "Hello from Go" }\n',
    "hello_test.go": 'package hello\n\nimport "testing"\n\nfunc TestGreeting(t *testing.T) {\n'
    '\tif Greeting() != "Hello from Go" {\n\t\tt.Fatal(Greeting())\n\t}\n}\n',
}


def test_language_default_builds_a_go_module(agent, project):
    task = push(agent.web, project, {"ci.yaml": "build:\n  language: go\n", **GO_MODULE})
    log = task_log(agent.web, task["task_id"])
    assert task["state"] == "success", log
    assert "$ go build ./..." in log and "$ go test ./..." in log
    assert "ok  \texample.com/hello" in log


MAVEN_AND_GO = """\
steps:
  - name: maven
    language: java
  - name: go
    language: go
    directory: go
"""


def test_one_pipeline_builds_a_maven_step_and_a_go_step(start_stack, docker_env, project):
    """On an agent that builds both languages (and says so): each step in its own container."""
    stack = start_stack("polyglot", CICD_WORKER_LANGUAGES="java,go", **docker_env)
    files = {**hello_maven(), "ci.yaml": MAVEN_AND_GO}
    files.update({f"go/{name}": text for name, text in GO_MODULE.items()})
    task = push(stack.web, project, files)
    log = task_log(stack.web, task["task_id"])
    assert task["state"] == "success", log
    steps = {s["name"]: s for s in requests.get(f"{stack.web}/api/tasks/{task['task_id']}",
                                               timeout=10).json()["steps"]}  # fmt: skip
    assert {name: s["state"] for name, s in steps.items()} == {"maven": "success", "go": "success"}
    assert "BUILD SUCCESS" in log and "ok  \texample.com/hello" in log
    go_log = requests.get(f"{stack.web}/api/tasks/{task['task_id']}/log", params={"step": "go"},
                          timeout=10).text  # fmt: skip
    assert "$ go test ./..." in go_log and "BUILD SUCCESS" not in go_log


def test_missing_dockerfile_fails_the_publish(agent, project, busybox_image):
    ci = f"build:\n  image: {busybox_image}\n  script: 'true'\npublish: true\n"
    task = push(agent.web, project, {"ci.yaml": ci})
    assert task["state"] == "failed" and task["stage"] == "publish"
    assert "no Dockerfile in the repository" in task["error"]


def test_wrong_registry_password_fails_the_task(start_stack, docker_env, project, registry):
    stack = start_stack("docker2", **{**docker_env, "CICD_REGISTRY_PASSWORD": "wrong-pw"})
    try:
        task = push(stack.web, project, hello_maven())
    finally:
        stack.worker.stop()
    assert task["state"] == "failed" and task["stage"] == "publish"
    assert "unauthorized" in task["error"]
    assert "CICD_REGISTRY_PASSWORD" in task["error"]  # the hint
    assert "wrong-pw" not in task_log(stack.web, task["task_id"])
    assert registry.tags(f"opscd/{project.project_path.lower()}") == []


def test_killed_worker_leaves_no_container_behind(agent, project, busybox_image, docker_client):
    env = agent.env
    node = Process("docker3", worker_args("docker3", "-Q", "opscd.test.docker3"), env,
                   agent.worker.log_path.parent)  # fmt: skip
    wait_ready(node)
    # A container this node started, as a build would, then the node dies hard.
    docker_client.containers.run(
        busybox_image, ["sleep", "300"], detach=True, network_mode="none",
        labels={LABEL: node_name(node)},
    )  # fmt: skip
    node.stop(signal.SIGKILL)
    assert len(build_containers(docker_client)) == 1
    again = Process("docker3-again", node.popen.args, env, agent.worker.log_path.parent)
    try:
        wait_ready(again)  # the restarted node removes what it left
        wait_until(lambda: build_containers(docker_client) == [], 20, "leftovers removed")
    finally:
        again.stop()


def node_name(node: Process) -> str:
    text = wait_until(lambda: "ready." in node.output() and node.output(), 5, "banner")
    return next(line.split()[-2] for line in text.splitlines() if line.endswith("ready."))


def test_cancel_kills_the_build_container(agent, project, busybox_image, docker_client):
    ci = f"build:\n  image: {busybox_image}\n  script:\n    - echo started\n    - sleep 300\n"
    sha = project.commit({"ci.yaml": ci})
    payload = gitlab_payload("push-event.json", project, "refs/heads/main", sha)
    task_id = post_gitlab(agent.web, payload).json()["task_id"]
    wait_until(lambda: "started" in task_log(agent.web, task_id), 60, "the container to start")
    assert len(build_containers(docker_client)) == 1
    response = change("post", f"{agent.web}/api/tasks/{task_id}/cancel", timeout=5)
    assert response.status_code == 200
    wait_until(lambda: build_containers(docker_client) == [], 15, "the container to go")
    task = wait_for_task(agent.web, task_id)
    assert task["state"] == "canceled"


# --- approvals ------------------------------------------------------------------------------


def with_approval(files: dict[str, str], approval: str) -> dict[str, str]:
    ci = files["ci.yaml"].replace("publish: true", f"publish:\n  approval: {approval}")
    assert ci != files["ci.yaml"]
    return {**files, "ci.yaml": ci}


def send(web: str, repo: GitRepo, files: dict[str, str], branch: str = "main") -> int:
    sha = repo.commit(files, branch=branch)
    payload = gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha)
    response = post_gitlab(web, payload)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def api(web: str, path: str, method: str = "get", **kwargs) -> requests.Response:
    return requests.request(method, f"{web}/api{path}", timeout=10, **kwargs)


def test_approval_holds_publish_until_a_person_approves(
    agent, start_web, project, registry, opscd_env
):
    ui = start_web(**{k: v for k, v in agent.env.items() if k.startswith("CICD_")},
                   CICD_UI_PASSWORD="ui-pw")  # fmt: skip
    task_id = send(agent.web, project, with_approval(hello_maven(), "[main, 'release/*']"))
    task = wait_until(
        lambda: (t := api(agent.web, f"/tasks/{task_id}").json())["state"] == "waiting" and t,
        120,
        "the build to wait for approval",
    )
    assert [s["state"] for s in task["stages"]] == ["success", "success", None]
    assert task["approval"]["required"] and task["approval"]["decision"] is None
    assert "publishing waits for approval" in task_log(agent.web, task_id)
    # Waiting holds no worker slot.
    wait_until(
        lambda: api(agent.web, "/agents").json()["agents"][0]["active"] == 0, 10, "a free slot"
    )
    # Approving needs the login when one is set, and records who approved.
    assert api(ui, f"/tasks/{task_id}/approve", "post").status_code == 401
    forged = api(ui, f"/tasks/{task_id}/approve", "post", auth=("admin", "ui-pw"))
    assert forged.status_code == 403  # a cross-site form cannot send X-Requested-With
    response = api(ui, f"/tasks/{task_id}/approve", "post", auth=("admin", "ui-pw"),
                   headers={"X-Requested-With": "test"})  # fmt: skip
    assert response.status_code == 200, response.text
    task = wait_for_task(agent.web, task_id, timeout=120)
    assert task["state"] == "success", task_log(agent.web, task_id)
    assert task["approval"]["decision"] == "approved"
    assert task["approval"]["decided_by"] == "admin" and task["approval"]["decided_at"]
    assert task["image"] and registry.tags(f"opscd/{project.project_path.lower()}")
    again = api(agent.web, f"/tasks/{task_id}/approve", "post", headers=CHANGE)
    assert again.status_code == 409 and "not waiting" in again.json()["error"]


def test_reject_ends_a_waiting_build_and_cleans_up(agent, project, opscd_env):
    task_id = send(agent.web, project, with_approval(hello_maven(), "true"))
    wait_until(
        lambda: api(agent.web, f"/tasks/{task_id}").json()["state"] == "waiting", 120, "waiting"
    )
    workspaces = Path(opscd_env["CICD_WORKSPACE_DIR"])
    assert [w for w in workspaces.iterdir() if w.name.startswith(f"task-{task_id}-")]
    response = api(agent.web, f"/tasks/{task_id}/reject", "post", headers=CHANGE)
    assert response.status_code == 200
    task = response.json()
    assert task["state"] == "canceled" and task["approval"]["decision"] == "rejected"
    wait_until(
        lambda: not [w for w in workspaces.iterdir() if w.name.startswith(f"task-{task_id}-")],
        20,
        "the workspace to be removed",
    )
    assert api(agent.web, f"/tasks/{task_id}").json()["stages"][2]["state"] is None


def test_approval_only_for_matching_branches(agent, project):
    task_id = send(agent.web, project, with_approval(hello_maven(), "[main]"), branch="dev")
    task = wait_for_task(agent.web, task_id, timeout=120)
    assert task["state"] == "success" and task["approval"] is None


def test_build_containers_are_locked_down(agent, project, busybox_image, docker_client):
    ci = f"build:\n  image: {busybox_image}\n  script:\n    - echo up\n    - sleep 30\n"
    task_id = send(agent.web, project, {"ci.yaml": ci})
    wait_until(lambda: "up" in task_log(agent.web, task_id), 60, "the container to run")
    (container,) = build_containers(docker_client)
    host = container.attrs["HostConfig"]
    assert host["Privileged"] is False
    assert "no-new-privileges" in " ".join(host.get("SecurityOpt") or [])
    assert host["Memory"] == 1024**3 and host["NanoCpus"] == 1_500_000_000
    assert host["PidsLimit"] == 4096
    assert host["NetworkMode"] == "none"
    sources = [m["Source"] for m in container.attrs["Mounts"]]
    assert not [s for s in sources if s.endswith(".sock")]
    change("post", f"{agent.web}/api/tasks/{task_id}/cancel", timeout=5)
    assert wait_for_task(agent.web, task_id)["state"] == "canceled"


def test_engine_sockets_cannot_be_mounted_into_builds(opscd_env):
    import subprocess
    import sys

    env = {**opscd_env, "CICD_DOCKER_VOLUMES": "/var/run/docker.sock:/var/run/docker.sock"}
    result = subprocess.run([sys.executable, "-m", "cicd.cli", "init-db"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and "owns the host" in result.stderr


def test_a_log_stream_left_open_is_closed_and_the_engine_says_when_the_container_ended(
    docker_client, busybox_image
):
    """The executor's guard against a follow stream that outlives its container (podman has
    kept one open after the container exited, and a build hung on it): closing the stream
    ends the read blocked on it, and the engine's state, not the stream, says "ended"."""
    container = docker_client.containers.run(
        busybox_image, ["sh", "-c", "echo started; sleep 60"], detach=True, network_mode="none"
    )
    try:
        chunks: list[bytes] = []
        copy = _LogCopy(container, chunks.append)
        copy.start()
        deadline = time.monotonic() + 10
        while b"started" not in b"".join(chunks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"started" in b"".join(chunks) and copy.is_alive()  # following, blocked
        assert not _has_ended(container)
        copy.close()
        copy.join(5)
        assert not copy.is_alive()
        assert b"interrupted" not in b"".join(chunks)  # closed on purpose: no error line
        container.kill()
        container.wait(timeout=30)
        assert _has_ended(container)
    finally:
        container.remove(force=True)
