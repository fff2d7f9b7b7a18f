"""Start-up configuration: a missing or bad setting stops the process and says what to set."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_missing_database_and_broker_urls_are_named():
    result = run(["cicd.cli", "init-db"])
    assert result.returncode != 0
    assert "CICD_DATABASE_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr
    result = run(["cicd.cli", "web"])
    assert result.returncode != 0
    assert "CICD_DATABASE_URL is not set" in result.stderr
    assert "CICD_BROKER_URL is not set" in result.stderr
    worker = run(["celery", "-A", "workers.celery_app", "worker"], CICD_DATABASE_URL="sqlite://")
    assert worker.returncode != 0
    assert "CICD_BROKER_URL is not set" in worker.stderr


def test_bad_values_are_explained():
    base = {"CICD_DATABASE_URL": "sqlite://", "CICD_BROKER_URL": "redis://x"}
    result = run(["cicd.cli", "init-db"], **base, CICD_WORKER_CONCURRENCY="zero")
    assert result.returncode != 0
    assert "CICD_WORKER_CONCURRENCY: Input should be a valid integer" in result.stderr
    result = run(["cicd.cli", "init-db"], **base, CICD_VISIBILITY_TIMEOUT="60")
    assert result.returncode != 0
    assert "CICD_VISIBILITY_TIMEOUT (60) must exceed CICD_MAX_BUILD_TIMEOUT" in result.stderr


def test_missing_config_file_is_named(tmp_path):
    result = run(["cicd.cli", "init-db"], CICD_CONFIG_FILE=str(tmp_path / "nope.env"))
    assert result.returncode != 0 and "nope.env does not exist" in result.stderr


def test_config_file_supplies_what_the_environment_does_not(tmp_path):
    database = tmp_path / "opscd.db"
    config = tmp_path / "opscd.env"
    config.write_text(f"CICD_DATABASE_URL=sqlite:///{database}\nCICD_BROKER_URL=redis://x\n")
    result = run(["cicd.cli", "init-db"], CICD_CONFIG_FILE=str(config))
    assert result.returncode == 0, result.stderr
    assert database.stat().st_size > 0


def test_readme_table_lists_every_setting():
    from cicd.config import Settings

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :].split("\n## ", 1)[0]
    missing = [
        f"CICD_{name.upper()}" for name in Settings.model_fields
        if f"CICD_{name.upper()}" not in table
    ]  # fmt: skip
    assert missing == []


@pytest.mark.parametrize("volume", [
    "/.:/host", "/usr/..:/host", "//:/host", "/var/run/docker.sock/.:/s", "/run/user/1000:/x",
    "/run/podman/podman.sock:/s", "/proc:/p", "/sys/fs:/s", "/dev:/d", "/etc:/e:rw", "/etc:/e:ro",
    "/etc/shadow:/s:ro", "/etc/ssl:/ssl", "/var/lib/containers/storage:/s", "/root/.ssh:/k:ro",
    "/srv/../var/run/docker.sock:/s", "/home/ci/.local/share/containers:/c",
])  # fmt: skip
def test_docker_volumes_that_give_builds_the_host_are_refused(volume):
    from cicd.config import settings_from
    from cicd.errors import ConfigError

    with pytest.raises(ConfigError, match="would give builds"):
        settings_from({"CICD_DOCKER_VOLUMES": volume})


def test_a_path_that_resolves_to_a_socket_or_system_folder_is_refused(tmp_path):
    import socket

    from cicd.config import settings_from
    from cicd.errors import ConfigError

    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "engine"))  # a socket by any name
    (tmp_path / "innocent").symlink_to("/proc/self")
    try:
        for host in (tmp_path / "engine", tmp_path / "innocent"):
            with pytest.raises(ConfigError, match="would give builds"):
                settings_from({"CICD_DOCKER_VOLUMES": f"{host}:/x:ro"})
    finally:
        listening.close()
    cache = tmp_path / "m2"
    cache.mkdir()
    allowed = f"{cache}:/cache:rw,/usr/share:/usr/share:ro,/etc/ssl/certs/java:/j:ro"
    assert settings_from({"CICD_DOCKER_VOLUMES": allowed}).volumes == allowed.split(",")
