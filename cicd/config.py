"""One settings object for every OpsCD process, read from ``CICD_*`` environment variables.

Twelve-factor style: the environment is the configuration. An optional file in
dotenv format (``CICD_CONFIG_FILE``) supplies values the environment does not
set, so an agent host can keep its credentials in one root-readable file.
Precedence, highest first: environment, config file, defaults below.

Each field is one row of the README's configuration table; keep them in step.
"""

from __future__ import annotations

import base64
import functools
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cicd.errors import ConfigError

__all__ = ["Settings", "load_settings", "settings_from", "basic_authorization"]


#: URL schemes of RabbitMQ (kombu's py-amqp transport); every other broker URL is Redis.
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
#: Seconds a stage may run past its build and clone timeouts before Celery kills it.
STAGE_MARGIN = 600


class Settings(BaseSettings):
    """Every setting OpsCD reads. Credentials are ``SecretStr`` so they never print."""

    model_config = SettingsConfigDict(env_prefix="CICD_", extra="ignore", frozen=True)

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the database, e.g. mysql+pymysql://opscd:pw@db/opscd",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL: redis://127.0.0.1:6379/0, or RabbitMQ's "
        "amqp://user:pw@host:5672/vhost",
    )
    broker_prefix: str = Field(
        default="",
        description="Prefix of every key OpsCD uses in Redis, so several installations "
        "(or test runs) can share one Redis server",
    )
    git_username: str | None = Field(default=None, description="User for cloning over HTTP")
    git_password: SecretStr | None = Field(
        default=None, description="Password or access token for cloning over HTTP"
    )
    workspace_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "opscd-workspaces",
        description="Where each build gets its own folder, removed when the build ends",
    )
    cache_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "opscd-cache",
        description="What this agent keeps between builds: git mirrors of the repositories it "
        "builds (git/), which full-history checkouts fetch from, and the projects' dependency "
        "caches (deps/, ci.yaml cache:)",
    )
    cache_max_bytes: int = Field(
        default=5 * 1024**3, ge=1,
        description="Bytes the dependency caches (CICD_CACHE_DIR/deps/) may take on this agent; "
        "past it the least recently used are removed, and a bigger cache is not saved",
    )  # fmt: skip
    executor: Literal["docker", "shell"] = Field(
        default="docker",
        description="How build scripts run: docker (in a container of build.image) or shell "
        "(on the worker host, for hosts without a container engine)",
    )
    shell_user: str | None = Field(
        default=None,
        description="Unprivileged user the shell executor runs build scripts as (the worker "
        "must run as root to switch to it); builds then cannot read the worker's settings",
    )
    shell_unsafe: bool = Field(
        default=False,
        description="Let a root worker run shell builds as root without CICD_SHELL_USER "
        "(a build can then read every credential of the worker)",
    )
    docker_host: str | None = Field(
        default=None,
        description="Docker Engine API of this agent; default: DOCKER_HOST, else the local socket",
    )
    docker_network: str = Field(
        default="bridge", description="Network mode of build containers and image builds"
    )
    docker_memory: str | None = Field(
        default=None, description="Memory limit of a build container, e.g. 2g"
    )
    docker_cpus: float | None = Field(
        default=None, gt=0, description="CPU limit of a build container, e.g. 1.5"
    )
    docker_pids_limit: int = Field(
        default=4096, ge=16, description="Most processes a build container may run (fork bombs)"
    )
    docker_volumes: str = Field(
        default="",
        description="Extra host folders for build containers, comma-separated "
        "HOST:CONTAINER[:ro|rw], like a runner's volumes",
    )
    docker_pull: Literal["if-not-present", "always", "never"] = Field(
        default="if-not-present", description="When to pull build.image before a build"
    )
    maven_settings: Path | None = Field(
        default=None,
        description="Host path of a Maven settings.xml mounted read-only into build containers",
    )
    maven_settings_target: str = Field(
        default="/root/.m2/settings.xml",
        description="Where build containers see CICD_MAVEN_SETTINGS (Maven's user settings)",
    )
    registry: str | None = Field(
        default=None,
        description="Registry and namespace images are pushed to, e.g. registry.example.com/team",
    )
    registry_insecure: bool = Field(
        default=False,
        description="The registry speaks plain HTTP (loopback registries always may), "
        "as the engine's insecure-registries setting says",
    )
    registry_username: str | None = Field(default=None, description="User for pushing images")
    registry_password: SecretStr | None = Field(
        default=None, description="Password or token for pushing images"
    )
    image_java: str | None = Field(default=None, description="Image for language: java builds")
    image_go: str | None = Field(default=None, description="Image for language: go builds")
    image_python: str | None = Field(default=None, description="Image for language: python builds")
    worker_languages: str = Field(
        default="",
        description="Languages this agent builds, comma-separated (java, go, python); "
        "empty: all. Builds of other languages are handed to agents that build them",
    )
    worker_concurrency: int = Field(default=3, ge=1, description="Builds one worker runs at once")
    step_concurrency: int = Field(
        default=2, ge=1,
        description="Steps of one build that run at once (independent steps of a ci.yaml "
        "depends_on graph); they share the build's slot",
    )  # fmt: skip
    build_timeout: int = Field(
        default=3600, ge=1, description="Seconds a build script may run when ci.yaml sets none"
    )
    max_build_timeout: int = Field(
        default=4 * 3600, ge=1, description="Upper bound on any build's timeout, ci.yaml included"
    )
    clone_timeout: int = Field(default=600, ge=1, description="Seconds a git clone may take")
    visibility_timeout: int | None = Field(
        default=None,
        description="Seconds before Redis redelivers an unacknowledged stage; "
        "default max_build_timeout + 1 h, must exceed max_build_timeout",
    )
    broker_consumer_timeout: int = Field(
        default=1800,
        ge=1,
        description="Seconds of RabbitMQ's consumer_timeout (rabbitmq.conf, in ms there; 30 "
        "min by default): a stage's message stays unacknowledged while it runs, and RabbitMQ "
        "closes the channel of one held longer, so it must exceed the longest stage",
    )
    secrets_key: SecretStr | None = Field(
        default=None,
        description="Key that encrypts project secret variables at rest: any long random "
        "string, the same on the web process and every agent",
    )
    ui_user: str = Field(default="admin", description="Login of the web pages and the API")
    ui_password: SecretStr | None = Field(
        default=None,
        description="Password of the web pages and the API; unset, they need no login "
        "(the webhook always checks its own secret)",
    )
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token accepted by the API in place of the login"
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Where the cicd tasks/agents/logs/secrets commands find the web process",
    )
    state_dir: Path = Field(
        default=Path(".opscd"),
        description="Where cicd up keeps its SQLite database, Redis socket and Flower password",
    )
    flower_user: str | None = Field(default=None, description="Login for Flower (cicd flower)")
    flower_password: SecretStr | None = Field(
        default=None, description="Password for Flower; Flower is never served without one"
    )
    agent_offline_after: float = Field(
        default=10.0,
        gt=0,
        description="Seconds without a heartbeat after which an agent is shown offline "
        "(agents heartbeat every 2 s)",
    )
    auto_cancel: bool = Field(
        default=False,
        description="A new push to a branch cancels that branch's older builds still queued, "
        "running or waiting",
    )
    max_attempts: int = Field(
        default=2,
        ge=1,
        description="Runs of a build whose agent died under it before it is marked failed",
    )
    reaper_interval: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between a worker's checks for builds of dead agents and "
        "builds recorded but never enqueued",
    )
    reconcile_after: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a recorded build may wait unsent before a worker enqueues it",
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL of the web process used in links; default: the request's own",
    )
    max_log_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="Most log bytes kept per build; output past it is cut with a marker, "
        "and the build keeps its real result",
    )
    max_body_bytes: int = Field(
        default=5 * 1024 * 1024, ge=1024, description="Largest webhook body accepted (413 above)"
    )
    log_level: str = Field(default="INFO", description="Python logging level of OpsCD's loggers")

    @field_validator("database_url", "broker_url")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _visibility_above_timeout(self) -> Settings:
        if (
            self.broker_kind != "amqp"  # RabbitMQ redelivers when a connection drops
            and self.visibility_timeout is not None
            and self.visibility_timeout <= self.max_build_timeout
        ):
            raise ValueError(
                f"CICD_VISIBILITY_TIMEOUT ({self.visibility_timeout}) must exceed "
                f"CICD_MAX_BUILD_TIMEOUT ({self.max_build_timeout}), or Redis redelivers "
                "a stage that is still running and it runs twice"
            )
        return self

    @model_validator(mode="after")
    def _consumer_timeout_above_stages(self) -> Settings:
        if self.broker_kind == "amqp" and self.broker_consumer_timeout <= self.stage_time_limit:
            raise ValueError(
                f"RabbitMQ's consumer_timeout (CICD_BROKER_CONSUMER_TIMEOUT, "
                f"{self.broker_consumer_timeout} s) must exceed the longest stage, "
                f"{self.stage_time_limit} s (CICD_MAX_BUILD_TIMEOUT + CICD_CLONE_TIMEOUT + "
                f"{STAGE_MARGIN}): RabbitMQ closes the channel of a longer one and delivers "
                "it again. Set  consumer_timeout = "
                f"{(self.stage_time_limit + 600) * 1000}  in rabbitmq.conf and "
                f"CICD_BROKER_CONSUMER_TIMEOUT={self.stage_time_limit + 600} on every OpsCD "
                "process, or lower CICD_MAX_BUILD_TIMEOUT"
            )
        return self

    @property
    def broker_kind(self) -> str | None:
        """``redis`` or ``amqp`` (RabbitMQ), by the broker URL's scheme; None if unset."""
        if not self.broker_url:
            return None
        scheme = self.broker_url.split("://", 1)[0].lower()
        return "amqp" if scheme in AMQP_SCHEMES else "redis"

    @property
    def stage_time_limit(self) -> int:
        """The most seconds one stage may take (Celery's hard limit, behind the executors'
        own timeouts): how long a stage's message may stay unacknowledged."""
        return self.max_build_timeout + self.clone_timeout + STAGE_MARGIN

    @property
    def broker_visibility_timeout(self) -> int:
        """Seconds Redis waits for an ack before redelivering; always above any build."""
        return self.visibility_timeout or self.max_build_timeout + 3600

    @field_validator("docker_volumes")
    @classmethod
    def _volumes(cls, value: str) -> str:
        for volume in _split_list(value):
            parts = volume.split(":")
            if len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2]):
                raise ValueError(f"{volume!r} is not HOST:CONTAINER[:ro|rw] with absolute paths")
            if len(parts) == 3 and parts[2] not in ("ro", "rw"):
                raise ValueError(f"{volume!r}: the mode must be ro or rw")
            refused = refused_host_path(parts[0], parts[2] if len(parts) == 3 else "rw")
            if refused:
                raise ValueError(
                    f"{volume!r} would give builds {refused} (a build with the host's "
                    "system folders or the engine's socket owns the host); mount something "
                    "narrower"
                )
        return value

    @field_validator("worker_languages")
    @classmethod
    def _languages(cls, value: str) -> str:
        from cicd.languages import LANGUAGES

        unknown = set(_split_list(value)) - set(LANGUAGES)
        if unknown:
            raise ValueError(f"unknown language(s) {sorted(unknown)}; known: {sorted(LANGUAGES)}")
        return value

    @property
    def languages(self) -> list[str]:
        """The languages this agent builds (``CICD_WORKER_LANGUAGES``), empty for all."""
        return _split_list(self.worker_languages)

    @property
    def volumes(self) -> list[str]:
        """``CICD_DOCKER_VOLUMES`` as a list of ``HOST:CONTAINER[:MODE]``."""
        return _split_list(self.docker_volumes)

    def language_image(self, language: str | None) -> str | None:
        """This agent's image for a language (``CICD_IMAGE_<LANGUAGE>``), if it sets one."""
        return getattr(self, f"image_{language}", None) if language else None

    def git_authorization(self) -> str | None:
        """The HTTP ``Authorization`` value git sends when cloning a project that has no git
        credentials of its own, if the instance's are set."""
        if not (self.git_username and self.git_password):
            return None
        return basic_authorization(self.git_username, self.git_password.get_secret_value())

    def secrets(self) -> list[str]:
        """Every credential value (and what is derived from one), so logs can mask them."""
        values = [
            self.git_password,
            self.registry_password,
            self.flower_password,
            self.ui_password,
            self.api_token,
            self.secrets_key,
        ]
        found = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
        for url in (self.database_url, self.broker_url):  # their passwords, if any
            password = urlsplit(url).password if url else None
            if password:
                found += [password, unquote(password)]
        authorization = self.git_authorization()
        return [*found, authorization.removeprefix("Basic ")] if authorization else found

    def check_shell_isolation(self) -> None:
        """Refuse a worker whose shell builds could read its credentials: as root without
        ``CICD_SHELL_USER`` (unless ``CICD_SHELL_UNSAFE``), a build user that is root or
        unknown, or a configuration file other users can read."""
        if self.executor != "shell":
            return
        if self.shell_user:
            import pwd

            try:
                entry = pwd.getpwnam(self.shell_user)
            except KeyError:
                raise ConfigError(f"CICD_SHELL_USER={self.shell_user}: no such user") from None
            if entry.pw_uid == 0:
                raise ConfigError("CICD_SHELL_USER must be an unprivileged user, not root")
            if os.geteuid() != 0:
                raise ConfigError("CICD_SHELL_USER needs a worker running as root to switch to it")
        elif os.geteuid() == 0 and not self.shell_unsafe:
            raise ConfigError(
                "the shell executor would run builds as root, where a build script reads the "
                "worker's credentials (/proc, CICD_CONFIG_FILE): set CICD_SHELL_USER to an "
                "unprivileged user, use CICD_EXECUTOR=docker, or set CICD_SHELL_UNSAFE=1"
            )
        config_file = os.environ.get("CICD_CONFIG_FILE")
        if config_file and os.stat(config_file).st_mode & 0o077:
            raise ConfigError(f"CICD_CONFIG_FILE={config_file} is readable by other users (and "
                              "so by shell builds): chmod 600 it")  # fmt: skip

    def require(self, *names: str) -> None:
        """Stop with one :class:`ConfigError` naming every setting in ``names`` that is unset."""
        missing = [
            f"CICD_{name.upper()} is not set: {type(self).model_fields[name].description}"
            for name in names
            if not _value(getattr(self, name))
        ]
        if missing:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(missing))


def _value(setting: object) -> object:
    return setting.get_secret_value() if isinstance(setting, SecretStr) else setting


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = "CICD_" + "_".join(str(p) for p in item["loc"]).upper()
        if item["loc"]:
            lines.append(f"{name}: {item['msg']}")
        else:
            lines.append(item["msg"].removeprefix("Value error, "))
    return "invalid configuration:\n  " + "\n  ".join(lines)


#: Host folders no build container may see: the host itself, its kernel interfaces, its
#: configuration, its users' runtime folders (sockets of their engines) and engine state.
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev", "/boot", "/root", "/run", "/var/run",
                  "/var/lib/docker", "/var/lib/containers", "/var/lib/kubelet")  # fmt: skip
#: Under /etc only read-only mounts, and none of these.
ETC_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh", "/etc/opscd")
ENGINE_NAMES = {"docker", "podman", "containerd", "containers", "crio"}


def refused_host_path(path: str, mode: str = "rw") -> str | None:
    """What mounting host ``path`` would give a build, if that must not be; else None.

    The path is normalised (``/.``, ``/usr/..``, ``//``) and resolved through
    symbolic links first, and both spellings are checked.
    """
    spellings = {os.path.normpath("/" + path.lstrip("/")), os.path.realpath(path)}
    for spelling in spellings:
        if spelling in ("/", "/etc"):
            return f"the host's {spelling}"
        under = [f for f in SYSTEM_FOLDERS if spelling == f or spelling.startswith(f + "/")]
        if under:
            return f"the host's {under[0]}"
        if spelling.startswith("/etc/") and (mode != "ro" or spelling.startswith(ETC_SECRETS)):
            return "the host's configuration (only read-only parts of /etc may be mounted)"
        if spelling.endswith(".sock") or ENGINE_NAMES & set(spelling.split("/")):
            return "the container engine"
        try:
            if stat.S_ISSOCK(os.stat(spelling).st_mode):
                return "a socket of the host"
        except OSError:
            pass
    return None


def basic_authorization(username: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@functools.cache
def load_settings() -> Settings:
    """The process's settings, read from its environment once, by its entry point.

    Entry points (``create_app``'s default, the worker's start, the CLI) call it
    and pass the result on; a missing or bad value is a :class:`ConfigError`.
    """
    return settings_from(os.environ)


def settings_from(environ: Mapping[str, str]) -> Settings:
    """Settings from ``environ`` (its ``CICD_*`` names), e.g. the environment of a child process.

    ``cicd up`` and the bench build the settings of the processes they start
    this way instead of writing them into their own ``os.environ``.
    """
    config_file = environ.get("CICD_CONFIG_FILE")
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"CICD_CONFIG_FILE={config_file} does not exist or is not a file")
    given = {
        name.removeprefix("CICD_").lower(): value
        for name, value in environ.items()
        if name.startswith("CICD_") and name.removeprefix("CICD_").lower() in Settings.model_fields
    }
    try:
        return Settings(_env_file=config_file or None, **given)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
