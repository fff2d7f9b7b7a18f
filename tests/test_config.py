"""Start-up configuration: a missing or bad setting stops the process and says what to set."""

from __future__ import annotations

import subprocess
import sys

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
