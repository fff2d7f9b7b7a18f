"""Registered projects through the API and ``cicd projects``, against a real gunicorn and MariaDB.

What a registration holds (identity, clone URL, a webhook secret shown once and
kept only as its hash, its own git credentials encrypted, ref patterns), and the
clear errors for what it must refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid

import pytest
import requests
from conftest import change, mysql_admin


@pytest.fixture(scope="module")
def installation(isolated_env, start_web) -> tuple[str, dict[str, str]]:
    """A web process with a database of its own (registrations are global to it)."""
    env = isolated_env("projects")
    web = start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})
    return web, env


def database_of(env: dict[str, str]) -> str:
    return env["CICD_DATABASE_URL"].rsplit("/", 1)[1].split("?")[0]


def path() -> str:
    return f"team-{uuid.uuid4().hex[:6]}/app"


def test_a_registration_shows_its_secret_once_and_stores_only_its_hash(installation):
    web, env = installation
    project = path()
    answer = change("post", f"{web}/api/projects", timeout=10, json={
        "project": project, "clone_url": "https://git.example.com/team/app.git",
        "protected": "main,release/*", "approval": "main",
        "git_username": "deploy-bot", "git_password": "per-project-token-123",
    })  # fmt: skip
    assert answer.status_code == 201, answer.text
    body = answer.json()
    secret = body["webhook_secret"]
    assert len(secret) >= 40 and body["webhook_url"].endswith("/webhooks/gitlab")
    assert body["project"]["protected"] == ["main", "release/*"]
    assert body["project"]["approval"] == ["main"]
    assert body["project"]["own_git_password"] is True
    shown = requests.get(f"{web}/api/projects/{project}", timeout=10)
    assert shown.status_code == 200 and shown.json()["clone_url"].endswith("/team/app.git")
    listed = requests.get(f"{web}/api/projects", timeout=10).text
    for answer_text in (shown.text, listed):
        assert secret not in answer_text and "per-project-token-123" not in answer_text
    ((digest, ciphertext),) = mysql_admin(
        f"SELECT webhook_secret_sha256, git_password_ciphertext FROM projects"
        f" WHERE path = '{project}'", database=database_of(env),
    )  # fmt: skip
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    assert "per-project-token-123" not in ciphertext  # encrypted at rest

    rotated = change("post", f"{web}/api/projects/{project}/rotate-secret", timeout=10)
    assert rotated.status_code == 200 and rotated.json()["webhook_secret"] != secret
    ((digest,),) = mysql_admin(f"SELECT webhook_secret_sha256 FROM projects WHERE path ="
                               f" '{project}'", database=database_of(env))  # fmt: skip
    assert digest == hashlib.sha256(rotated.json()["webhook_secret"].encode()).hexdigest()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"project": "../etc", "clone_url": "https://x/y.git"}, 400, "must look like group/app"),
        ({"project": "a/b", "clone_url": "ssh://git@x/y.git"}, 400, "http:// or https://"),
        ({"project": "a/b", "clone_url": "https://u:p@x/y.git"}, 400, "must not hold credentials"),
        ({"project": "a/*", "clone_url": "https://x/a"}, 400, "prefix ending in '/'"),
        ({"project": "a/b", "clone_url": "https://x/y.git", "protected": "main branch"}, 400,
         "not a ref pattern"),
        ({"project": "a/b", "clone_url": "https://x/y.git", "git_username": "u"}, 400,
         "give both"),
        ({"clone_url": "https://x/y.git"}, 400, "send a JSON object"),
    ],
)  # fmt: skip
def test_bad_registrations_are_refused_saying_why(installation, body, status, says):
    web, _ = installation
    answer = change("post", f"{web}/api/projects", json=body, timeout=10)
    assert answer.status_code == status and says in answer.json()["error"], answer.text


def test_a_path_registers_once_and_changes_and_goes_through_the_api(installation):
    web, _ = installation
    project = path()
    first = {"project": project, "clone_url": "https://git.example.com/t/app.git"}
    assert change("post", f"{web}/api/projects", json=first, timeout=10).status_code == 201
    again = change("post", f"{web}/api/projects", json=first, timeout=10)
    assert again.status_code == 409 and "registered already" in again.json()["error"]
    changed = change("patch", f"{web}/api/projects/{project}", timeout=10,
                             json={"protected": ["main", "v*"], "approval": "v*"})  # fmt: skip
    assert changed.status_code == 200 and changed.json()["protected"] == ["main", "v*"]
    unknown = change("patch", f"{web}/api/projects/{project}", json={"path": "x/y"}, timeout=10)
    assert unknown.status_code == 400 and "cannot change path" in unknown.json()["error"]
    assert change("delete", f"{web}/api/projects/{project}", timeout=10).status_code == 204
    gone = requests.get(f"{web}/api/projects/{project}", timeout=10)
    assert gone.status_code == 404 and "is not registered" in gone.json()["error"]
    # The project's secret variables keep their own routes beside the registration's.
    assert requests.get(f"{web}/api/projects/{project}/secrets", timeout=10).status_code == 200


def test_namespace_registrations_cover_a_group(installation):
    web, _ = installation
    group = f"group-{uuid.uuid4().hex[:6]}/*"
    body = {"project": group, "clone_url": "https://git.example.com/g/"}
    answer = change("post", f"{web}/api/projects", json=body, timeout=10)
    assert answer.status_code == 201, answer.text
    assert answer.json()["project"]["namespace"] is True


def test_cli_registers_lists_changes_rotates_and_removes(installation):
    web, _ = installation
    env = {"PATH": os.environ["PATH"], "CICD_API_URL": web}

    def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cicd.cli", "projects", *args], env=env,
                              capture_output=True, text=True, timeout=60, **kwargs)  # fmt: skip

    project = path()
    added = cli("add", project, "--clone-url", "https://git.example.com/t/app.git",
                "--git-username", "bot", "--git-password-stdin", "--json",
                input="cli-token-456\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    shown_once = json.loads(added.stdout)
    assert shown_once["project"] == project and shown_once["webhook_secret"]
    assert shown_once["webhook_url"] == f"{web}/webhooks/gitlab"
    listed = cli("list")
    assert project in listed.stdout and shown_once["webhook_secret"] not in listed.stdout
    show = cli("show", project)
    assert json.loads(show.stdout)["git_username"] == "bot" and "cli-token-456" not in show.stdout
    assert cli("set", project, "--protected", "main,hotfix/*").returncode == 0
    assert json.loads(cli("show", project).stdout)["protected"] == ["main", "hotfix/*"]
    assert cli("set", project, "--instance-git").returncode == 0
    assert json.loads(cli("show", project).stdout)["own_git_password"] is False
    rotated = cli("rotate-secret", project)
    assert rotated.returncode == 0 and "webhook secret:" in rotated.stdout
    assert shown_once["webhook_secret"] not in rotated.stdout
    assert cli("rm", project).returncode == 0
    missing = cli("show", project)
    assert missing.returncode == 1 and "404" in missing.stderr
    assert "not registered" in missing.stderr
    refused = cli("add", "bad path", "--clone-url", "https://x/y.git")
    assert refused.returncode == 1 and "must look like group/app" in refused.stderr
