"""Step → container options: the docker executor's pure translation (no engine needed).

The end-to-end behaviour is in test_docker.py; this pins the rules themselves.
"""

from __future__ import annotations

from pathlib import Path

from cicd.config import Settings
from workers.executors.base import Step, shell_script
from workers.executors.convert import LABEL_NODE, container_options


def settings(**values: object) -> Settings:
    return Settings(database_url="sqlite://", broker_url="redis://x", **values)


STEP = Step(
    name="7-build",
    commands=["mvn -B package", "echo 'done; $(not run here)'"],
    workspace=Path("/srv/ws/task-7-x/src"),
    workdir="/usr/src/mymaven",
    environment={"CI": "true"},
    image="maven:3.9",
    timeout=60,
)


def test_checkout_is_mounted_at_workdir_and_is_the_working_directory():
    options = container_options(STEP, settings(), "opscd-7-build-x", {LABEL_NODE: "n@h"})
    assert options["volumes"][0] == "/srv/ws/task-7-x/src:/usr/src/mymaven:rw"
    assert options["working_dir"] == "/usr/src/mymaven"
    assert options["image"] == "maven:3.9" and options["environment"] == {"CI": "true"}
    assert options["command"] == ["/bin/sh", "-c", shell_script(STEP.commands)]
    assert options["labels"] == {LABEL_NODE: "n@h"}


def test_agent_mounts_and_limits_come_from_the_settings():
    options = container_options(
        STEP,
        settings(
            maven_settings="/etc/opscd/settings.xml",
            docker_volumes="/cache/m2:/root/.m2/repository:rw, /usr/share/maven-repo:/repo:ro",
            docker_network="none",
            docker_memory="2g",
            docker_cpus=1.5,
            docker_pids_limit=512,
        ),
        "n",
        {},
    )
    assert options["volumes"][1:] == [
        "/etc/opscd/settings.xml:/root/.m2/settings.xml:ro",
        "/cache/m2:/root/.m2/repository:rw",
        "/usr/share/maven-repo:/repo:ro",
    ]
    assert options["network_mode"] == "none"
    assert options["mem_limit"] == "2g" and options["nano_cpus"] == 1_500_000_000
    assert options["pids_limit"] == 512


def test_containers_are_never_privileged_and_unlimited_only_when_asked():
    options = container_options(STEP, settings(), "n", {})
    assert options["privileged"] is False
    assert options["security_opt"] == ["no-new-privileges"]
    assert "mem_limit" not in options and "nano_cpus" not in options
    assert options["pids_limit"] == 4096


def test_the_script_echoes_each_command_and_stops_at_the_first_failure():
    script = shell_script(["make", "echo 'a b' $HOME"])
    assert script.splitlines() == [
        "set -e",
        "printf '%s\\n' '$ make'",
        "make",
        "printf '%s\\n' '$ echo '\"'\"'a b'\"'\"' $HOME'",
        "echo 'a b' $HOME",
    ]
