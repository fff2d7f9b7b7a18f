"""Real container services for tests: a distribution registry and podman's Docker-compatible API.

There is no Docker engine on the test machines. ``PodmanService`` runs ``podman system service``
on a private unix socket with its own configuration and its own storage (graphroot, runroot,
tmp, volumes, networks, events log) under a root directory; the ``docker`` SDK talks to it
unchanged. Two host paths stay shared, as podman 4.3 running as root hardcodes them: the blob-info
cache ``/var/lib/containers/cache/blob-info-cache-v1.boltdb`` (a small digest-to-registry index
written by every image copy: import, build, push, pull) and netavark's ``/run/containers/networks``.
``Registry`` runs the CNCF distribution registry (Debian's ``docker-registry``) on loopback with
htpasswd auth and plain HTTP. Nothing is ever pulled from the internet: Docker Hub and the other
registries Debian's short-name aliases point at are *blocked* in the service's registries.conf,
and base images are made locally (``make_busybox_image``, ``make_host_tools_image``).

Containers must never use podman's default bridge network (its 10.88.x.x addresses are outside
loopback): run them with ``network_mode="none"`` or ``"host"``.

Typical use::

    with Registry(tmp / "registry", "ci", "s3cret") as registry, \\
            PodmanService(tmp / "podman", [registry.address]) as podman:
        image = make_busybox_image(podman)
        client = podman.client()
        container = client.containers.run(image, ["echo", "hi"], network_mode="none", detach=True)
        assert container.wait()["StatusCode"] == 0
        container.remove()

A failed push or pull does not raise: it is an ``{"error": ..., "errorDetail": ...}`` item of
``client.api.push(..., stream=True, decode=True)``. podman 4.3's push stream has no ``aux`` item:
the digest is only in the last status line, ``"TAG: digest: sha256:... size: N"``.

The host-tools image borrows the host's ``/usr`` (Java, Maven, Debian's Maven repository)::

    image = make_host_tools_image(podman)
    settings = write_maven_settings(tmp / "settings.xml", "/cache/m2")
    volumes = [*HOST_TOOL_MOUNTS, f"{settings}:/root/.m2/settings.xml:ro", ...]
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self
from xml.sax.saxutils import escape

import docker
import requests

from .processes import Process, free_port, wait_until

__all__ = [
    "HOST_TOOL_MOUNTS",
    "MANIFEST_MEDIA_TYPES",
    "MAVEN_REPOSITORY",
    "MAVEN_SETTINGS_TEMPLATE",
    "PodmanService",
    "Registry",
    "make_busybox_image",
    "make_host_tools_image",
    "write_maven_settings",
]

BUSYBOX = Path("/bin/busybox")
MAVEN_REPOSITORY = "/usr/share/maven-repo"
# Registries that Debian's short-name aliases (registries.conf.d/shortnames.conf) point at: the
# podman service blocks them, so a short or mistyped image name fails at once, offline.
BLOCKED_REGISTRIES = (
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "quay.io",
    "registry.access.redhat.com",
    "registry.redhat.io",
    "registry.fedoraproject.org",
    "registry.opensuse.org",
    "registry.suse.com",
    "container-registry.oracle.com",
    "gcr.io",
    "ghcr.io",
)
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
# The host's /usr is mounted one directory at a time, not as a whole: a read-only /usr would leave
# no room for mount points such as /usr/src/mymaven (the usual Maven workdir) or /usr/local/...
_HOST_TOOL_PATHS = (
    "/usr/bin",  # sh, coreutils, java, javac, mvn (via /etc/alternatives)
    "/usr/sbin",
    "/usr/lib",  # libc, the JDK (/usr/lib/jvm), Go (/usr/lib/go-*)
    "/usr/lib64",  # the dynamic loader
    "/usr/libexec",
    "/usr/share",  # Maven (/usr/share/maven) and Debian's Maven repository
    "/etc/alternatives",  # /usr/bin/java, javac, mvn -> /etc/alternatives/... -> /usr/...
    "/etc/java-17-openjdk",  # the JDK's conf/ and lib/jvm.cfg are symlinks into it
    "/etc/maven",  # /usr/share/maven/conf and bin/m2.conf are symlinks into it
    "/etc/ssl/certs/java",  # the JDK's lib/security/cacerts -> /etc/ssl/certs/java/cacerts
)
# "host:container:ro" volumes that make the host-tools image a Java 17 + Maven build image.
HOST_TOOL_MOUNTS: list[str] = [
    f"{path}:{path}:ro" for path in _HOST_TOOL_PATHS if Path(path).exists()
]


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Service:
    """A service process the tests start in ``root``: launched, waited for until it answers
    (or failing with its log if it exits first), stopped by :meth:`stop`."""

    root: Path
    log_path: Path
    _process: Process | None

    def _launch(self, name: str, args: list[str], env: dict[str, str],
                answers: Callable[[], bool], timeout: float, what: str) -> None:  # fmt: skip
        self._process = Process(name, args, env, self.root)  # logs to root / f"{name}.log"

        def ready() -> bool:
            assert self._process is not None
            if self._process.popen.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log()}")
            return answers()

        try:
            wait_until(ready, timeout, what)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- registry -------------------------------------------------------------------------------


class Registry(_Service):
    """The distribution registry (``docker-registry serve``): 127.0.0.1, plain HTTP, htpasswd.

    Storage, configuration and log live under ``root``; ``address`` is ``127.0.0.1:PORT``.
    """

    def __init__(self, root: Path, username: str, password: str) -> None:
        self.root = Path(root)
        self.username = username
        self.password = password
        self.port: int | None = None
        self.log_path = self.root / "registry.log"
        self._process: Process | None = None
        self._session = requests.Session()

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("registry not started")
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def auth_config(self) -> dict[str, str]:
        """The credentials in the form the docker SDK's ``push``/``pull``/``login`` take."""
        return {"username": self.username, "password": self.password}

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self._session = requests.Session()
        self._session.auth = (self.username, self.password)
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", self.username, self.password],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        (self.root / "htpasswd").write_text(htpasswd.strip() + "\n")
        (self.root / "data").mkdir(exist_ok=True)
        self.port = free_port()
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
            f"auth:\n  htpasswd:\n    realm: opscd-test\n    path: {self.root / 'htpasswd'}\n"
        )
        args = ["docker-registry", "serve", str(config)]
        self._launch("registry", args, dict(os.environ), self._answers_401, 20,
                     f"the registry on {self.address}")  # fmt: skip
        return self

    def _answers_401(self) -> bool:
        try:
            return requests.get(f"{self.url}/v2/", timeout=1).status_code == 401
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        self._session.close()

    def _get(self, path: str) -> requests.Response:
        return self._session.get(f"{self.url}{path}", timeout=10)

    def catalog(self) -> list[str]:
        response = self._get("/v2/_catalog")
        response.raise_for_status()
        return list(response.json().get("repositories") or [])

    def tags(self, repository: str) -> list[str]:
        """Tags of ``repository`` (e.g. ``opscd/hello``); [] if the registry does not know it."""
        response = self._get(f"/v2/{repository}/tags/list")
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return list(response.json().get("tags") or [])

    def manifest_digest(self, repository: str, tag: str) -> str:
        """The ``Docker-Content-Digest`` of ``repository:tag``'s manifest (OCI or Docker v2)."""
        response = self._session.head(
            f"{self.url}/v2/{repository}/manifests/{tag}",
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
            timeout=10,
        )
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]


# --- podman ---------------------------------------------------------------------------------


class PodmanService(_Service):
    """``podman system service`` on ``unix://<root>/podman.sock`` with private config and storage.

    ``docker_host`` is the socket URL for ``DOCKER_HOST``; ``env`` holds the ``CONTAINERS_*``
    variables that make a ``podman`` CLI call use the same configuration and storage (``podman()``
    does that); ``storage_driver`` is the first of ``storage_drivers`` that works: ``overlay``
    where the kernel allows it, else ``vfs``.
    Registries in ``insecure_registries`` (``host:port``) are reached over plain HTTP.
    """

    def __init__(
        self,
        root: Path,
        insecure_registries: list[str],
        storage_drivers: tuple[str, ...] = ("overlay", "vfs"),
    ) -> None:
        self.root = Path(root)
        self.insecure_registries = list(insecure_registries)
        self.storage_drivers = storage_drivers
        self.socket_path = self.root / "podman.sock"
        self.docker_host = f"unix://{self.socket_path}"
        self.graphroot = self.root / "storage"
        self.runroot = self.root / "run"
        self.tmpdir = self.root / "tmp"
        self.log_path = self.root / "podman-service.log"
        self.env: dict[str, str] = {
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
        }
        self.storage_driver: str | None = None
        self._process: Process | None = None

    # configuration

    def _write_containers_conf(self) -> None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1048576
        q = _toml_string
        Path(self.env["CONTAINERS_CONF"]).write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"events_logfile_path = {q(str(self.tmpdir / 'events.log'))}\n"
            f"tmp_dir = {q(str(self.tmpdir))}\n"
            f"image_copy_tmp_dir = {q(str(self.tmpdir))}\n"
            f"volume_path = {q(str(self.graphroot / 'volumes'))}\n"
            # Short names through the Docker API stay short instead of becoming docker.io/...
            "compat_api_enforce_docker_hub = false\n"
            "[network]\n"
            f"network_config_dir = {q(str(self.root / 'networks'))}\n"
        )

    def _write_registries_conf(self) -> None:
        lines = [
            "# No unqualified-search-registries: short names never reach a remote registry.",
            "unqualified-search-registries = []",
            'short-name-mode = "enforcing"',
        ]
        for location in self.insecure_registries:
            lines += ["", "[[registry]]", f"location = {_toml_string(location)}", "insecure = true"]
        for location in BLOCKED_REGISTRIES:
            lines += ["", "[[registry]]", f"location = {_toml_string(location)}", "blocked = true"]
        Path(self.env["CONTAINERS_REGISTRIES_CONF"]).write_text("\n".join(lines) + "\n")

    def _write_storage_conf(self, driver: str) -> None:
        Path(self.env["CONTAINERS_STORAGE_CONF"]).write_text(
            "[storage]\n"
            f"driver = {_toml_string(driver)}\n"
            f"graphroot = {_toml_string(str(self.graphroot))}\n"
            f"runroot = {_toml_string(str(self.runroot))}\n"
        )

    def _cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERS_")}
        env.pop("DOCKER_HOST", None)
        return {**env, **self.env, "TMPDIR": str(self.tmpdir)}

    def podman(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the ``podman`` CLI on this service's storage (check=True, output captured)."""
        try:
            return subprocess.run(
                ["podman", *args], env=self._cli_env(), input=input, capture_output=True,
                check=True,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            stderr = exc.stderr.decode(errors="replace").strip()
            raise RuntimeError(
                f"podman {' '.join(args)} failed ({exc.returncode}): {stderr}"
            ) from exc

    def _choose_storage_driver(self) -> str:
        """The first of ``storage_drivers`` podman can initialise here (overlay test-mounts)."""
        for driver in self.storage_drivers:
            self._write_storage_conf(driver)
            try:
                found = self.podman("info", "--format", "{{.Store.GraphDriverName}}")
            except RuntimeError:
                self._remove_storage()
                continue
            if found.stdout.decode().strip() == driver:
                return driver
            self._remove_storage()
        raise RuntimeError(f"podman works with none of the storage drivers {self.storage_drivers}")

    # lifecycle

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(exist_ok=True)
        (self.root / "networks").mkdir(exist_ok=True)
        self._write_containers_conf()
        self._write_registries_conf()
        self.storage_driver = self._choose_storage_driver()
        self.socket_path.unlink(missing_ok=True)
        args = ["podman", "system", "service", "--time=0", self.docker_host]
        self._launch("podman-service", args, self._cli_env(), self._pings, 30,
                     f"podman to answer on {self.docker_host}")  # fmt: skip
        return self

    def _pings(self) -> bool:
        if not self.socket_path.exists():
            return False
        client = docker.DockerClient(base_url=self.docker_host, timeout=2)
        try:
            return bool(client.ping())
        except (docker.errors.APIError, requests.RequestException):
            return False
        finally:
            client.close()

    def client(self, timeout: int = 300) -> docker.DockerClient:
        """A new docker SDK client of this service; close it when done."""
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    def mounts(self) -> list[str]:
        """Mount points under ``root`` (layer, shm and bind mounts podman left behind)."""
        prefix = str(self.root.resolve()) + "/"
        found = []
        for line in Path("/proc/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(point)
        return found

    def stop(self) -> None:
        """Stop the service, remove all containers and images, unmount and delete the storage."""
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self.storage_driver is not None:
            try:
                self.podman("system", "reset", "--force")
            except RuntimeError:
                pass  # whatever it left is unmounted and removed below
        self._remove_storage()

    def _remove_storage(self) -> None:
        for point in sorted(self.mounts(), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        for path in (self.graphroot, self.runroot, self.tmpdir):
            shutil.rmtree(path, ignore_errors=True)
        self.tmpdir.mkdir(parents=True, exist_ok=True)


# --- base images ----------------------------------------------------------------------------


def _tar_add(
    tar: tarfile.TarFile,
    name: str,
    kind: bytes = tarfile.DIRTYPE,
    *,
    mode: int = 0o755,
    data: bytes = b"",
    target: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = int(time.time())
    if kind == tarfile.SYMTYPE:
        info.linkname = target
        tar.addfile(info)
    elif kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _import(podman: PodmanService, rootfs: bytes, name: str, *changes: str) -> str:
    args = ["import"]
    for change in changes:
        args += ["--change", change]
    podman.podman(*args, "-", name, input=rootfs)
    return name


def _is_static_elf(data: bytes) -> bool:
    """True if ``data`` is a 64-bit little-endian ELF executable without a PT_INTERP header."""
    if data[:6] != b"\x7fELF\x02\x01":
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    headers = (data[phoff + i * phentsize : phoff + i * phentsize + 4] for i in range(phnum))
    return all(int.from_bytes(p_type, "little") != 3 for p_type in headers)  # 3: PT_INTERP


def make_busybox_image(podman: PodmanService, name: str = "localhost/busybox:latest") -> str:
    """Import a busybox image (static ``/bin/busybox``, a symlink per applet); return ``name``."""
    binary = BUSYBOX.read_bytes()
    if not _is_static_elf(binary):
        raise RuntimeError(f"{BUSYBOX} is not statically linked: apt-get install busybox-static")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "etc", "root"):
            _tar_add(tar, directory)
        _tar_add(tar, "tmp", mode=0o1777)
        _tar_add(tar, "bin/busybox", tarfile.REGTYPE, data=binary)
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                _tar_add(tar, f"bin/{applet}", tarfile.SYMTYPE, target="busybox")
        _tar_add(
            tar, "etc/passwd", tarfile.REGTYPE, mode=0o644, data=b"root:x:0:0:root:/root:/bin/sh\n"
        )
        _tar_add(tar, "etc/group", tarfile.REGTYPE, mode=0o644, data=b"root:x:0:\n")
    return _import(podman, buffer.getvalue(), name, "ENV PATH=/bin", 'CMD ["/bin/sh"]')


# The skeleton's own /usr: mount points for the host's directories, and room for work dirs.
_USR_DIRECTORIES = (
    *(path.removeprefix("/") for path in _HOST_TOOL_PATHS if path.startswith("/usr/")),
    "usr/src",
    "usr/local",
    "usr/local/bin",
    "usr/local/sbin",
)


def make_host_tools_image(
    podman: PodmanService, name: str = "localhost/opscd-hosttools:latest"
) -> str:
    """Import an image that is only a skeleton for the host's ``/usr``; return ``name``.

    Run it with ``HOST_TOOL_MOUNTS`` as volumes: it then has the host's sh, coreutils, Java 17,
    Maven (with Debian's repository at ``/usr/share/maven-repo``) and Go (Debian's golang-go,
    ``/usr/lib/go-*``), the way CI agents mount host
    tool volumes. Its own ``/usr/src`` and ``/usr/local`` stay writable (e.g. for a workdir
    ``/usr/src/mymaven``).
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for link in ("bin", "lib", "lib64", "sbin"):
            _tar_add(tar, link, tarfile.SYMTYPE, target=f"usr/{link}")
        for directory in ("etc", "root", "usr", *_USR_DIRECTORIES):
            _tar_add(tar, directory, mode=0o700 if directory == "root" else 0o755)
        _tar_add(tar, "tmp", mode=0o1777)
        _tar_add(
            tar, "etc/passwd", tarfile.REGTYPE, mode=0o644, data=b"root:x:0:0:root:/root:/bin/sh\n"
        )
        _tar_add(tar, "etc/group", tarfile.REGTYPE, mode=0o644, data=b"root:x:0:\n")
    return _import(
        podman,
        buffer.getvalue(),
        name,
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV HOME=/root",
        "ENV LANG=C.UTF-8",
        'CMD ["/bin/sh"]',
    )


# --- maven ----------------------------------------------------------------------------------

MAVEN_SETTINGS_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Offline Maven: every repository is mirrored by Debian's packaged one (file://). -->
<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0"
          xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
          xsi:schemaLocation="http://maven.apache.org/SETTINGS/1.0.0
                              https://maven.apache.org/xsd/settings-1.0.0.xsd">
{local_repository}  <interactiveMode>false</interactiveMode>
  <mirrors>
    <mirror>
      <id>debian</id>
      <name>Debian's packaged Maven repository</name>
      <url>file://{maven_repository}</url>
      <mirrorOf>*</mirrorOf>
    </mirror>
  </mirrors>
  <profiles>
    <profile>
      <!-- Debian's repository has no checksum files: do not warn about each artifact. -->
      <id>no-checksums</id>
      <repositories>
        <repository>
          <id>central</id>
          <url>https://repo.maven.apache.org/maven2</url>
          <releases><checksumPolicy>ignore</checksumPolicy></releases>
          <snapshots><enabled>false</enabled></snapshots>
        </repository>
      </repositories>
      <pluginRepositories>
        <pluginRepository>
          <id>central</id>
          <url>https://repo.maven.apache.org/maven2</url>
          <releases><checksumPolicy>ignore</checksumPolicy></releases>
          <snapshots><enabled>false</enabled></snapshots>
        </pluginRepository>
      </pluginRepositories>
    </profile>
  </profiles>
  <activeProfiles>
    <activeProfile>no-checksums</activeProfile>
  </activeProfiles>
</settings>
"""


def write_maven_settings(path: Path, local_repository: str | None) -> Path:
    """Write a settings.xml using ``local_repository`` (None: Maven's default, or what the
    build says) and mirroring ``*`` to Debian's repo."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    element = (
        f"  <localRepository>{escape(local_repository)}</localRepository>\n"
        if local_repository is not None
        else ""
    )
    path.write_text(
        MAVEN_SETTINGS_TEMPLATE.format(local_repository=element, maven_repository=MAVEN_REPOSITORY)
    )
    return path
