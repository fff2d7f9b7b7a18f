"""The container test infrastructure (``tests/containers.py``) against real components.

A distribution registry with htpasswd auth and podman's Docker-compatible API, each started once
for this module, driven through the ``docker`` SDK the way OpsCD's docker executor drives it:
run containers, build the sample Maven project in a container, build its image from a
Dockerfile, push it with credentials, pull it back and run it. Containers never join podman's
default bridge network: every one runs with ``network_mode="none"``.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from conftest import REGISTRY_USER
from docker.models.containers import Container
from support.containers import (
    HOST_TOOL_MOUNTS,
    PodmanService,
    Registry,
    write_maven_settings,
)

PROJECT = Path(__file__).resolve().parent / "projects" / "hello-maven"


def run_container(
    client: docker.DockerClient, image: str, command: list[str] | None = None, **options
) -> tuple[int, str]:
    """Run ``image`` to completion with no network; return (exit code, output); remove it."""
    container: Container = client.containers.create(image, command, network_mode="none", **options)
    try:
        container.start()
        status = container.wait(timeout=180)
        return status["StatusCode"], container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


@dataclass
class MavenBuild:
    project: Path  # a copy of hello-maven, built in a container
    local_repository: Path  # the host side of the settings' localRepository
    exit_code: int
    output: str


@pytest.fixture(scope="session")
def maven_build(docker_client, hosttools_image: str, tmp_path_factory) -> MavenBuild:
    """``mvn -B package`` of a copy of hello-maven in the host-tools image, like ci.yaml says."""
    work = tmp_path_factory.mktemp("maven")
    project = work / "hello-maven"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("target"))
    local_repository = work / "m2-repository"
    local_repository.mkdir()
    settings = write_maven_settings(work / "settings.xml", "/cache/m2-repository")
    volumes = [
        *HOST_TOOL_MOUNTS,
        f"{settings}:/root/.m2/settings.xml:ro",
        f"{local_repository}:/cache/m2-repository",
        f"{project}:/usr/src/mymaven",
    ]
    code, output = run_container(
        docker_client, hosttools_image, ["sh", "-c", "mvn -B package"],
        working_dir="/usr/src/mymaven", volumes=volumes,
    )  # fmt: skip
    return MavenBuild(project, local_repository, code, output)


@dataclass
class PushedImage:
    repository: str  # in the registry, e.g. opscd/hello-1a2b3c4d
    tag: str
    reference: str  # 127.0.0.1:PORT/opscd/hello-...:TAG
    image_id: str
    push_items: list[dict]


@pytest.fixture(scope="session")
def pushed_image(docker_client, registry: Registry, maven_build: MavenBuild) -> PushedImage:
    """The project's Dockerfile built through the API and pushed with credentials."""
    assert maven_build.exit_code == 0, maven_build.output
    repository = f"opscd/hello-{uuid.uuid4().hex[:8]}"
    tag = "1.0.0"
    reference = f"{registry.address}/{repository}:{tag}"
    build_items = list(
        docker_client.api.build(
            path=str(maven_build.project), tag=reference, decode=True, rm=True,
            network_mode="none",
        )
    )  # fmt: skip
    assert not [item for item in build_items if "error" in item], build_items
    image_ids = [item["aux"]["ID"] for item in build_items if "ID" in item.get("aux", {})]
    assert image_ids, build_items
    push_items = list(
        docker_client.api.push(
            f"{registry.address}/{repository}", tag=tag, auth_config=registry.auth_config,
            stream=True, decode=True,
        )
    )  # fmt: skip
    return PushedImage(repository, tag, reference, image_ids[-1], push_items)


# --- tests ----------------------------------------------------------------------------------


def test_podman_answers_the_docker_api(podman: PodmanService, docker_client) -> None:
    assert docker_client.ping() is True
    assert podman.docker_host == f"unix://{podman.root}/podman.sock"
    assert podman.storage_driver in {"overlay", "vfs"}
    info = docker_client.info()
    assert info["Driver"] == podman.storage_driver
    # The service's image and container storage is its own, not the host's /var/lib/containers.
    assert info["DockerRootDir"].startswith(str(podman.root))


def test_remote_registries_are_blocked(docker_client) -> None:
    """Docker Hub and short names are refused by configuration, before any connection.

    A failed pull does not raise from ``api.pull(stream=True)``: it is an ``error`` item.
    """
    blocked = "registry docker.io is blocked"
    no_search = "no unqualified-search registries are defined"
    expected = {
        "docker.io/library/alpine": (blocked,),
        "alpine": (blocked, no_search),  # blocked if a short-name alias maps it to docker.io
        "opscd-no-such-image": (no_search,),
    }
    for name, messages in expected.items():
        items = list(docker_client.api.pull(name, "latest", stream=True, decode=True))
        assert len(items) == 1, items
        assert any(message in items[0]["error"] for message in messages), items


def test_busybox_container_output_and_exit_code(docker_client, busybox_image: str) -> None:
    container = docker_client.containers.create(
        busybox_image, ["sh", "-c", "echo hello from busybox; ls /sys/class/net; exit 3"],
        network_mode="none",
    )  # fmt: skip
    try:
        container.start()
        assert container.wait(timeout=30)["StatusCode"] == 3
        output = container.logs().decode()
    finally:
        container.remove(force=True)
    assert "hello from busybox" in output
    assert output.split()[-1] == "lo"  # no network but loopback
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)


def test_host_tools_image_has_java_and_maven(docker_client, hosttools_image: str) -> None:
    code, output = run_container(
        docker_client, hosttools_image, ["sh", "-c", "java -version 2>&1 && mvn -v"],
        volumes=HOST_TOOL_MOUNTS,
    )  # fmt: skip
    assert code == 0, output
    assert 'openjdk version "17' in output
    assert "Apache Maven 3" in output


def test_maven_package_in_a_container(maven_build: MavenBuild) -> None:
    assert maven_build.exit_code == 0, maven_build.output
    assert "BUILD SUCCESS" in maven_build.output
    assert "Tests run: 3, Failures: 0, Errors: 0" in maven_build.output
    assert (maven_build.project / "target" / "hello.jar").is_file()
    # Maven used the mounted settings.xml: its localRepository is populated from the mirror.
    repository = maven_build.local_repository
    assert (repository / "junit" / "junit" / "4.13.2" / "junit-4.13.2.jar").is_file()
    assert (repository / "org" / "apache" / "maven" / "plugins" / "maven-jar-plugin").is_dir()
    assert "file:///usr/share/maven-repo" in maven_build.output


def test_built_image_is_pushed_with_credentials(
    registry: Registry, pushed_image: PushedImage
) -> None:
    items = pushed_image.push_items
    assert not [item for item in items if "error" in item], items
    assert pushed_image.repository in registry.catalog()
    assert registry.tags(pushed_image.repository) == [pushed_image.tag]
    digest = registry.manifest_digest(pushed_image.repository, pushed_image.tag)
    assert digest.startswith("sha256:")
    # podman 4.3's push stream: two status lines, no per-layer progress and no "aux" item; the
    # digest is only in the last status line ("TAG: digest: sha256:... size: N").
    first = {"status": f"The push refers to repository [{pushed_image.reference}]"}
    assert items[0] == first, items
    assert [item for item in items if "aux" in item] == []
    assert items[-1]["status"].startswith(f"{pushed_image.tag}: digest: {digest} size: ")


def test_push_with_a_wrong_password_yields_an_error_item(
    docker_client, registry: Registry, busybox_image: str
) -> None:
    repository = f"opscd/denied-{uuid.uuid4().hex[:8]}"
    docker_client.images.get(busybox_image).tag(f"{registry.address}/{repository}", "1")
    try:
        items = list(
            docker_client.api.push(
                f"{registry.address}/{repository}", tag="1", stream=True, decode=True,
                auth_config={"username": REGISTRY_USER, "password": "wrong"},
            )
        )  # fmt: skip
    finally:
        docker_client.images.remove(f"{registry.address}/{repository}:1")
    errors = [item for item in items if "error" in item]
    assert len(errors) == 1, items
    assert "unauthorized" in errors[0]["error"]
    assert errors[0]["errorDetail"]["message"] == errors[0]["error"]
    assert registry.tags(repository) == []


def test_pushed_image_pulls_back_and_runs(
    docker_client, registry: Registry, pushed_image: PushedImage
) -> None:
    docker_client.images.remove(pushed_image.reference, force=True)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(pushed_image.reference)
    repository = f"{registry.address}/{pushed_image.repository}"
    # Without credentials the pull fails; the SDK then reports the image as not found.
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.pull(repository, tag=pushed_image.tag)
    image = docker_client.images.pull(
        repository, tag=pushed_image.tag, auth_config=registry.auth_config
    )
    assert image.id == pushed_image.image_id
    digest = registry.manifest_digest(pushed_image.repository, pushed_image.tag)
    assert f"{repository}@{digest}" in image.attrs["RepoDigests"]
    code, output = run_container(docker_client, pushed_image.reference, volumes=HOST_TOOL_MOUNTS)
    assert code == 0, output
    assert output.strip() == "Hello from OpsCD"
