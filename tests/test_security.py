"""Hostile input and secrets: no injection, no escape from the workspace, nothing leaked.

Against the real web process and workers; the webhook parser is also fuzzed
in-process with hypothesis, seeded with GitLab's recorded payloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from conftest import (
    GIT_PASSWORD,
    GitRepo,
    change,
    gitlab_payload,
    mysql_admin,
    post_gitlab,
    register_project,
    task_log,
    wait_for_task,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.gitlab import FIXTURES
from support.services import PrivateRedis

from cicd.errors import PayloadError
from cicd.forges import Ignored, PushEvent, gitlab
from workers.logs import MAX_PENDING_CHARS, LogWriter, Masker

pytestmark = pytest.mark.usefixtures("workers")

ECHO_REF = 'build:\n  script:\n    - echo "ref=[$CI_COMMIT_REF_NAME]"\n    - pwd\n'


def push_branch(web: str, repo: GitRepo, branch: str, ci: str = ECHO_REF) -> requests.Response:
    sha = repo.commit({"ci.yaml": ci}, branch=branch)
    return post_gitlab(web, gitlab_payload("push-event.json", repo, f"refs/heads/{branch}", sha))


# --- hostile names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "branch",
    [
        "feat/$(touch${IFS}/tmp/opscd-pwned)",
        "x;touch${IFS}/tmp/opscd-pwned;`id`",
        "fonctionnalité/été-🚀",
        "a'b\"c|d&e>f",
    ],
)
def test_branch_names_with_metacharacters_are_data_never_code(web, repo, opscd_env, branch):
    marker = Path("/tmp/opscd-pwned")
    marker.unlink(missing_ok=True)
    response = push_branch(web, repo, branch)
    assert response.status_code == 202, response.text
    task = wait_for_task(web, response.json()["task_id"])
    assert task["state"] == "success", task_log(web, task["task_id"])
    assert task["branch"] == branch
    log = task_log(web, task["task_id"])
    assert f"ref=[{branch}]" in log
    workspace_root = opscd_env["CICD_WORKSPACE_DIR"]
    assert f"{workspace_root}/task-{task['task_id']}-" in log  # ran inside its workspace
    assert not marker.exists()
    assert not list(Path(workspace_root).glob("**/pwned"))


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("refs/heads/../../etc", "not a valid git ref name"),
        ("refs/heads//etc/passwd", "not a valid git ref name"),
        ("refs/heads/line\nbreak", "not a valid git ref name"),
        ("refs/heads/" + "b" * 1000, "1 to 255 characters"),
        ("refs/heads/-rf", "not a valid git ref name"),
    ],
)
def test_impossible_ref_names_are_refused_clearly(web, repo, ref, reason):
    payload = gitlab_payload("push-event.json", repo, ref, "a" * 40)
    response = post_gitlab(web, payload)
    assert response.status_code == 400
    assert reason in response.json()["error"]


@pytest.mark.parametrize("path", ["../../$(id)/..;rm -rf /", "group/app\n", "a/.b", "a//b", "a/b."])
def test_project_names_that_are_no_project_path_are_refused(web, repo, path):
    """A project path never becomes a file path, a command or an image name: one GitLab
    could not have made is refused before anything is looked up or recorded."""
    sha = repo.commit({"ci.yaml": ECHO_REF})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    payload["project"]["path_with_namespace"] = path
    before = requests.get(f"{web}/api/tasks", params={"limit": 500}, timeout=10).json()
    response = post_gitlab(web, payload)
    assert response.status_code == 400
    assert "project.path_with_namespace" in response.json()["error"]
    after = requests.get(f"{web}/api/tasks", params={"limit": 500}, timeout=10).json()
    assert after == before


# --- hostile bodies -------------------------------------------------------------------------


def test_oversized_body_is_413(web):
    body = b'{"object_kind": "push", "x": "' + b"a" * (6 * 1024 * 1024) + b'"}'
    response = post_gitlab(web, body)
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]


def test_deeply_nested_json_is_400(web):
    body = b'{"object_kind": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = post_gitlab(web, body)
    assert response.status_code == 400


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_wrong_content_type_with_garbage_is_400(web, content_type):
    response = post_gitlab(web, b"payload=%7B%7D", **{"Content-Type": content_type})
    assert response.status_code == 400


SEEDS = [json.loads((FIXTURES / "gitlab" / name).read_text())
         for name in ("push-event.json", "tag-event.json", "system-push-event.json")]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=12,
)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> dict:
    """A recorded payload with some fields replaced, removed or retyped."""
    payload = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 4))):
        target = payload
        path = draw(st.sampled_from(
            [("ref",), ("after",), ("checkout_sha",), ("object_kind",), ("project",),
             ("project", "path_with_namespace"), ("project", "git_http_url"), ("commits",),
             ("user_name",), ("before",), ("repository",)]
        ))  # fmt: skip
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            if draw(st.booleans()):
                target.pop(path[-1], None)
            else:
                target[path[-1]] = draw(json_values)
    return payload


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=mutated_payloads(),
    event=st.sampled_from(["Push Hook", "Tag Push Hook", "System Hook", "Note Hook"]),
)
def test_parser_only_ever_accepts_ignores_or_explains(payload, event):
    try:
        result = gitlab.parse({"X-Gitlab-Event": event}, json.dumps(payload).encode())
    except PayloadError as error:
        assert str(error)
        return
    assert isinstance(result, PushEvent | Ignored)
    if isinstance(result, PushEvent):
        assert result.clone_url.startswith(("http://", "https://"))
        assert "\n" not in result.ref_name and ".." not in result.ref_name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(payload=mutated_payloads(), raw=st.binary(max_size=200))
def test_the_webhook_never_answers_500(web, payload, raw):
    for body in (json.dumps(payload).encode(), raw):
        response = post_gitlab(web, body)
        assert response.status_code in (200, 202, 400, 401, 404, 413), response.text


# --- secrets --------------------------------------------------------------------------------


def test_project_secrets_reach_the_build_masked_and_never_leave_the_server(web, repo, database_url):
    token = "s3cr3t-" + uuid.uuid4().hex
    url = f"{web}/api/projects/{repo.project_path}/secrets/DEPLOY_TOKEN"
    assert change("put", url, json={"value": token}, timeout=5).status_code == 201
    listed = requests.get(f"{web}/api/projects/{repo.project_path}/secrets", timeout=5)
    assert [s["name"] for s in listed.json()["secrets"]] == ["DEPLOY_TOKEN"]
    assert token not in listed.text
    database = database_url.rsplit("/", 1)[1].split("?")[0]
    stored = mysql_admin("SELECT ciphertext FROM project_secrets", database=database)
    assert stored and all(token not in row[0] for row in stored)  # encrypted at rest

    ci = (
        "build:\n"
        "  secrets: [DEPLOY_TOKEN]\n"
        "  script:\n"
        "    - 'echo \"whole: $DEPLOY_TOKEN\"'\n"
        "    - |\n"
        '      head="${DEPLOY_TOKEN%????????}"; tail="${DEPLOY_TOKEN#"$head"}"\n'
        "      printf 'split: %s' \"$head\"; sleep 0.4; printf '%s\\n' \"$tail\"\n"
        f'    - test "${{#DEPLOY_TOKEN}}" -eq {len(token)}\n'
    )
    sha = repo.commit({"ci.yaml": ci})
    task = wait_for_task(
        web,
        post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha)).json()[
            "task_id"
        ],
    )
    log = task_log(web, task["task_id"])
    assert task["state"] == "success", log
    assert token not in log and token[8:] not in log
    assert "whole: [MASKED]" in log and "split: [MASKED]" in log
    assert GIT_PASSWORD not in log

    ci_missing = "build:\n  secrets: [NOT_SET]\n  script: 'true'\n"
    sha = repo.commit({"ci.yaml": ci_missing})
    task = wait_for_task(
        web,
        post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha)).json()[
            "task_id"
        ],
    )
    assert task["state"] == "failed" and "NOT_SET" in task["error"]
    assert change("delete", url, timeout=5).status_code == 204
    assert change("delete", url, timeout=5).status_code == 404


def test_cli_manages_secrets_without_showing_values(web):
    import subprocess
    import sys

    env = {"PATH": os.environ["PATH"], "CICD_API_URL": web}
    run = lambda *args, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "cicd.cli", "secrets", *args], env=env, capture_output=True,
        text=True, timeout=60, **kw,
    )  # fmt: skip
    added = run("set", "team/cli-app", "API_KEY", input="very-secret-value\n")
    assert added.returncode == 0 and "added API_KEY" in added.stdout
    listed = run("list", "team/cli-app")
    assert "API_KEY" in listed.stdout and "very-secret-value" not in listed.stdout
    assert run("rm", "team/cli-app", "API_KEY").returncode == 0
    bad = run("set", "team/cli-app", "bad name", "--value", "x")
    assert bad.returncode != 0 and "variable name" in bad.stderr


# --- limits and locks -----------------------------------------------------------------------


def test_log_limit_cuts_the_output_and_keeps_the_real_result(start_stack, git_server):
    stack = start_stack("small-logs", CICD_MAX_LOG_BYTES="20000")
    repo = GitRepo.create(git_server.root, f"limits/app-{uuid.uuid4().hex[:6]}")
    repo.clone_url = git_server.repo_url(repo.project_path)
    for ci, state, code in [
        ("build:\n  script:\n    - yes 0123456789abcdef | head -n 4000\n", "success", 0),
        ("build:\n  script:\n    - yes 0123456789abcdef | head -n 4000\n    - exit 2\n",
         "failed", 2),
    ]:  # fmt: skip
        sha = repo.commit({"ci.yaml": ci})
        response = post_gitlab(stack.web, gitlab_payload("push-event.json", repo,
                                                         "refs/heads/main", sha))  # fmt: skip
        task = wait_for_task(stack.web, response.json()["task_id"])
        log = task_log(stack.web, task["task_id"])
        assert task["state"] == state and task["exit_code"] == code
        assert "log truncated here" in log
        assert len(log.encode()) < 20000 + 1000
        if code:
            assert "ERROR: build failed: build script exited with code 2" in log


def test_broker_with_a_password(start_stack, git_server, tmp_path):
    password = "redis-" + uuid.uuid4().hex
    broker = PrivateRedis(tmp_path / "redis", password=password).start()
    try:
        stack = start_stack("locked", CICD_BROKER_URL=broker.url)
        repo = GitRepo.create(git_server.root, f"locked/app-{uuid.uuid4().hex[:6]}")
        repo.clone_url = git_server.repo_url(repo.project_path)
        sha = repo.commit({"ci.yaml": "build:\n  script: echo through a locked broker\n"})
        response = post_gitlab(stack.web, gitlab_payload("push-event.json", repo,
                                                         "refs/heads/main", sha))  # fmt: skip
        task = wait_for_task(stack.web, response.json()["task_id"])
        assert task["state"] == "success"
        assert password not in stack.worker.output()
    finally:
        broker.stop()


@pytest.mark.usefixtures("workers")
def test_a_cross_site_form_cannot_change_anything_even_with_no_login(web, repo):
    """With no login set (a local install), a page of any site could POST a form to the API
    on loopback: changes need X-Requested-With (or a Bearer token), which forms cannot send."""
    sha = repo.commit({"ci.yaml": "build:\n  script: sleep 20\n"})
    task_id = post_gitlab(web, gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
                          ).json()["task_id"]  # fmt: skip
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}
    for method in ("post", "put", "patch", "delete"):
        forged = requests.request(method, f"{web}/api/tasks/{task_id}/cancel", data="x=1",
                                  headers=form, timeout=10)  # fmt: skip
        assert forged.status_code in (403, 405), method
    forged = requests.post(f"{web}/api/tasks/{task_id}/cancel", headers=form, timeout=10)
    assert forged.status_code == 403 and "X-Requested-With" in forged.json()["error"]
    assert requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()["state"] != "canceled"
    assert change("post", f"{web}/api/tasks/{task_id}/cancel", timeout=10).status_code == 200


def test_a_foreign_host_name_is_not_served(start_web, web):
    """DNS rebinding: a name of the attacker's, pointed at 127.0.0.1, makes the browser treat
    this server as the attacker's site. Only IP addresses, loopback names and the host of
    CICD_PUBLIC_URL are served; the webhook and /healthz answer any name."""
    port = web.rsplit(":", 1)[1]
    for host, served in [("evil.example", False), (f"evil.example:{port}", False),
                         (f"localhost:{port}", True), (f"127.0.0.1:{port}", True),
                         (f"[::1]:{port}", True), ("ci.example.com", False)]:  # fmt: skip
        answer = requests.get(f"{web}/api/tasks", headers={"Host": host}, timeout=10)
        assert (answer.status_code == 200) is served, (host, answer.status_code)
        if not served:
            assert answer.status_code == 421 and "CICD_PUBLIC_URL" in answer.json()["error"]
        page = requests.get(f"{web}/", headers={"Host": host}, timeout=10)
        assert (page.status_code == 200) is served, host
    assert requests.get(f"{web}/healthz", headers={"Host": "evil.example"}, timeout=10).ok
    hook = post_gitlab(web, b"{}", Host="evil.example")
    assert hook.status_code == 200 and "ignored" in hook.json()
    named = start_web(CICD_PUBLIC_URL="https://ci.example.com")
    answer = requests.get(f"{named}/api/tasks", headers={"Host": "ci.example.com"}, timeout=10)
    assert answer.status_code == 200


def test_a_bearer_token_needs_no_extra_header(start_web):
    token = "api-" + uuid.uuid4().hex
    web = start_web(CICD_API_TOKEN=token)
    bearer = {"Authorization": f"Bearer {token}"}
    answer = requests.post(f"{web}/api/tasks/999999999/retry", headers=bearer, timeout=10)
    assert answer.status_code == 404  # reached the route: no X-Requested-With needed


def test_ui_and_api_need_the_login_when_one_is_set(start_web):
    web = start_web(CICD_UI_PASSWORD="ui-secret", CICD_API_TOKEN="api-" + "t" * 20)
    assert requests.get(f"{web}/api/tasks", timeout=5).status_code == 401
    assert requests.get(f"{web}/api/tasks", auth=("admin", "nope"), timeout=5).status_code == 401
    assert requests.get(f"{web}/api/tasks", auth=("admin", "ui-secret"), timeout=5).ok
    bearer = {"Authorization": "Bearer api-" + "t" * 20}
    assert requests.get(f"{web}/api/agents", headers=bearer, timeout=5).ok
    assert requests.get(f"{web}/healthz", timeout=5).ok
    # The webhook keeps its own secret, not the UI login.
    assert post_gitlab(web, b"{}", token="wrong").status_code == 401
    assert "ignored" in post_gitlab(web, b"{}").json()  # reached the parser, no login asked


# --- a broker message decides no path and no project -------------------------------------------

STAGE_INPUTS = """
import json
import uuid
from cicd import db, projects
from cicd.config import load_settings
from cicd.errors import StageError
from cicd.models import RefType, TaskDetail
from workers.stages import task_record, task_workspace
from workers.workspace import create_workspace

db.configure(load_settings())
suffix = uuid.uuid4().hex[:8]
projects.register("trusted/app" + suffix, "http://127.0.0.1:9/x.git")
with db.session() as session:
    ours, other = (TaskDetail(forge="gitlab", project=name, clone_url="http://127.0.0.1:9/x.git",
                              ref_type=RefType.BRANCH, ref_name="main", commit_sha="0" * 40)
                   for name in ("trusted/app" + suffix, "victim/app" + suffix))
    session.add_all([ours, other])
    session.commit()
mine, theirs = create_workspace(ours.id), create_workspace(other.id)
refused = []
for named in ("/etc", str(theirs), str(mine) + "/..", str(mine.parent / f"task-{ours.id}x")):
    try:
        task_workspace({"task_id": ours.id, "workspace": named})
    except StageError as error:
        refused.append(str(error))
print(json.dumps({
    "refused": refused,
    "own": str(task_workspace({"task_id": ours.id, "workspace": str(mine)})[1]),
    "mine": str(mine),
    "project": task_record(ours.id).variables["CI_PROJECT_PATH"],
}))
"""


def test_stages_take_paths_and_the_project_from_their_own_records_not_the_message(opscd_env):
    """A forged stage message (``workspace``, ``variables``) could point the build at another
    build's checkout or select another project's secrets: the stages check the path against
    the agent's own workspaces of that build and read the project from the database."""
    result = subprocess.run([sys.executable, "-c", STAGE_INPUTS], env=opscd_env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert len(found["refused"]) == 4, found
    assert all("is not a workspace of build" in message for message in found["refused"])
    assert found["own"] == found["mine"] + "/src"
    assert found["project"].startswith("trusted/app")


def test_database_and_broker_passwords_are_masked_too():
    from cicd.config import settings_from

    settings = settings_from({
        "CICD_DATABASE_URL": "mysql+pymysql://opscd:db%40pass@db.example/opscd",
        "CICD_BROKER_URL": "redis://:broker-pass@redis.example:6379/0",
    })  # fmt: skip
    masked = Masker(settings.secrets())
    text = masked("db%40pass db@pass broker-pass")
    assert "pass" not in text.replace("[MASKED]", ""), text


def test_a_secret_cut_by_a_forced_flush_is_still_masked():
    """An unfinished line of 64 KB is flushed without waiting for its end: a secret that
    straddles that cut must not be stored in two unmasked halves."""
    secret = "s3cret-" + uuid.uuid4().hex
    stored: list[str] = []
    writer = LogWriter(stored.append, Masker([secret]))
    writer.write("a" * MAX_PENDING_CHARS + secret[:9])
    writer.tick()  # over the limit: forced out
    assert stored, "nothing was flushed"
    writer.write(secret[9:] + " end\n")
    writer.close()
    assert "".join(stored) == "a" * MAX_PENDING_CHARS + "[MASKED] end\n"


def test_each_line_of_a_secret_of_several_lines_is_masked():
    key = "-----BEGIN KEY-----\nAAAAB3NzaC1yc2E" + uuid.uuid4().hex + "\n-----END KEY-----"
    stored: list[str] = []
    writer = LogWriter(stored.append, Masker([key]))
    writer.write(key.split("\n")[1] + "\n")  # a script printed one line of it
    writer.close()
    assert "AAAAB3" not in "".join(stored)


@pytest.mark.usefixtures("workers")
def test_ci_yaml_values_never_travel_in_broker_messages_or_approvals(web, repo, database_url):
    """Stage messages (shown by Flower) and the approval record carry ids, not ci.yaml's
    environment: stages read the rest from the database and the checkout."""
    marker = "env-value-" + uuid.uuid4().hex
    secret = register_project(web, repo.project_path, repo.clone_url, approval="main")
    ci = f"build:\n  env:\n    TOKENISH: {marker}\n  script: [echo built]\npublish: true\n"
    sha = repo.commit({"ci.yaml": ci, "Dockerfile": "FROM scratch\n"})
    payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
    task_id = post_gitlab(web, payload, token=secret).json()["task_id"]
    wait_until(lambda: requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()["state"]
               == "waiting", 60, "the build to wait for approval")  # fmt: skip
    database = database_url.rsplit("/", 1)[1].split("?")[0]
    ((context,),) = mysql_admin(f"SELECT context FROM task_approvals WHERE task_id = {task_id}",
                                database=database)  # fmt: skip
    assert marker not in context
    # Ids and this agent's own paths and name (where the checkout is), never ci.yaml values.
    assert set(json.loads(context)) <= {"task_id", "attempt", "workspace", "checkout", "handed_on",
                                        "node"}  # fmt: skip
    assert change("post", f"{web}/api/tasks/{task_id}/reject", timeout=10).status_code == 200


def test_cicd_trigger_serves_only_that_repository_under_a_random_path(tmp_path):
    """While ``cicd trigger`` runs, any local user can reach its git server on loopback: it
    must serve the one repository, at a path nobody can guess, not its folder's neighbours."""
    from cicd.trigger import served

    env = {"PATH": os.environ["PATH"], "GIT_TERMINAL_PROMPT": "0", "HOME": str(tmp_path),
           "GIT_CONFIG_NOSYSTEM": "1"}  # fmt: skip
    for name in ("hello", "private"):
        folder = tmp_path / "projects" / name
        folder.mkdir(parents=True)
        (folder / "file.txt").write_text(name)
        for args in (
            ["init", "-q", "-b", "main"],
            ["add", "."],
            ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", name],
        ):
            subprocess.run(["git", *args], cwd=folder, env=env, check=True)  # fmt: skip

    def ls_remote(url: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "ls-remote", url], env=env, capture_output=True,
                              text=True, timeout=30)  # fmt: skip

    with served(tmp_path / "projects" / "hello") as (_, url):
        base, served_as = url.rsplit("/", 1)
        assert len(served_as) >= 24 and "hello" not in served_as
        assert "refs/heads/main" in ls_remote(url).stdout
        for guess in ("hello/.git", "private/.git", "private", "hello", "projects/private"):
            assert ls_remote(f"{base}/{guess}").returncode != 0, guess


def test_endless_git_output_is_bounded_not_held(tmp_path):
    """A git server can stream "remote:" lines without end; the clone keeps a bounded head
    and tail for the log and counts the rest (50 MB here, through real git)."""
    from workers.stages.clone import MAX_GIT_OUTPUT, _git

    stored: list[str] = []
    writer = LogWriter(stored.append, Masker([]))
    noise = "!yes 'remote: noise' | head -c 50000000"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}
    _git(["-c", f"alias.noise={noise}", "noise"], tmp_path, env, writer)
    writer.close()
    logged = "".join(stored)
    assert len(logged) < MAX_GIT_OUTPUT * 1.5
    assert logged.startswith("remote: noise") and "bytes of git output not kept" in logged


# --- shell builds run as a user of their own --------------------------------------------------

SHELL_USER = "opscd-build-test"


@pytest.fixture(scope="module")
def shell_user() -> str:
    """An unprivileged system user for shell builds (the tests run as root)."""
    import pwd

    try:
        pwd.getpwnam(SHELL_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SHELL_USER], check=True)  # fmt: skip
    return SHELL_USER


SNOOP = """\
build:
  script: |
    echo "uid=$(id -u) home=$HOME"
    cat /proc/$PPID/environ >/dev/null 2>&1 && echo "read the worker" || echo "worker unreadable"
    echo "settings seen: $(cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c CICD_)"
    ls "$(dirname "$(dirname "$PWD")")" >/dev/null 2>&1 && echo "listed" || echo "unlisted"
    touch built.txt && echo "wrote the checkout"
"""


def test_shell_builds_run_as_their_own_user_and_cannot_read_the_worker(
    start_stack, repo, shell_user, tmp_path
):
    """A root worker's shell build ran as root: /proc/$PPID/environ gave it the secrets key,
    the database and registry passwords. As CICD_SHELL_USER it reads none of them."""
    config = tmp_path / "agent.env"
    config.write_text("CICD_REGISTRY_PASSWORD=registry-secret-in-a-file\n")
    config.chmod(0o600)
    stack = start_stack("shell-user", CICD_SHELL_USER=shell_user, CICD_SHELL_UNSAFE="0",
                        CICD_CONFIG_FILE=str(config))  # fmt: skip
    try:
        sha = repo.commit({"ci.yaml": SNOOP})
        answer = post_gitlab(stack.web, gitlab_payload("push-event.json", repo,
                                                       "refs/heads/main", sha))  # fmt: skip
        task = wait_for_task(stack.web, answer.json()["task_id"])
        log = task_log(stack.web, task["task_id"])
    finally:
        stack.worker.stop()
    assert task["state"] == "success", log
    import pwd

    ran_as = next(line for line in log.splitlines() if line.startswith("uid="))
    assert ran_as.startswith(f"uid={pwd.getpwnam(shell_user).pw_uid} home=/")
    assert ran_as.endswith("/home")  # the workspace's own HOME
    assert "worker unreadable" in log and "settings seen: 0" in log, log
    assert "unlisted" in log and "wrote the checkout" in log


@pytest.mark.parametrize(("settings", "message"), [
    ({}, "set CICD_SHELL_USER"),
    ({"CICD_SHELL_USER": "root"}, "unprivileged user, not root"),
    ({"CICD_SHELL_USER": "no-such-user-here"}, "no such user"),
    ({"CICD_SHELL_UNSAFE": "1", "CICD_CONFIG_FILE": "{readable}"}, "readable by other users"),
])  # fmt: skip
def test_a_root_worker_refuses_shell_builds_that_could_read_it(tmp_path, settings, message):
    readable = tmp_path / "agent.env"
    readable.write_text("CICD_EXECUTOR=shell\n")
    readable.chmod(0o644)
    env = {"PATH": os.environ["PATH"], "CICD_DATABASE_URL": "sqlite://",
           "CICD_BROKER_URL": "redis://127.0.0.1:9/0", "CICD_EXECUTOR": "shell",
           **{k: v.format(readable=readable) for k, v in settings.items()}}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
