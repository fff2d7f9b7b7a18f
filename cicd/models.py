"""The database schema as SQLAlchemy 2.0 models; ``sql/schema.sql`` is the same schema as DDL.

A test creates the schema from ``sql/schema.sql`` in MariaDB and compares it with
these models, so change both together. Timestamps are naive UTC with microseconds.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "TaskState",
    "Stage",
    "StageState",
    "StepState",
    "RefType",
    "TaskDetail",
    "TaskStatus",
    "TaskStage",
    "TaskStep",
    "TaskLog",
    "AgentState",
    "Agent",
    "TaskApproval",
    "ApprovalDecision",
    "ProjectSecret",
    "CommitStatus",
    "ProjectCache",
    "utcnow",
    "STAGES",
]

# MySQL keeps microseconds only when asked to; elsewhere a plain DateTime does.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only

TABLE_ARGS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def utcnow() -> dt.datetime:
    """Now in UTC, naive, the way every timestamp column stores it."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def iso(value: dt.datetime | None) -> str | None:
    """A stored (naive UTC) time as the API shows it: ISO 8601 with ``Z``."""
    return value.isoformat() + "Z" if value is not None else None


class TaskState(enum.StrEnum):
    """Where a build is in its life; ``queued`` until a worker starts its first stage."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # built; publish waits for a person's approval
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCESS, TaskState.FAILED, TaskState.CANCELED)


class Stage(enum.StrEnum):
    """The fixed, ordered stages of every build."""

    CLONE = "clone"
    BUILD = "build"
    PUBLISH = "publish"


STAGES = tuple(Stage)


class StageState(enum.StrEnum):
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELED = "canceled"


class StepState(enum.StrEnum):
    """Where one step of a build's pipeline is; ``skipped`` steps have a ``reason``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELED = "canceled"


class RefType(enum.StrEnum):
    BRANCH = "branch"
    TAG = "tag"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e], length=16)


class Base(DeclarativeBase):
    pass


class TaskDetail(Base):
    """What to build: one row per accepted push, written once by the webhook."""

    __tablename__ = "task_details"
    __table_args__ = (
        UniqueConstraint("forge", "delivery_id", name="uq_task_details_delivery"),
        Index("ix_task_details_project_ref", "project", "ref_name"),
        TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    forge: Mapped[str] = mapped_column(String(32))
    delivery_id: Mapped[str | None] = mapped_column(String(128))
    project: Mapped[str] = mapped_column(String(255))
    clone_url: Mapped[str] = mapped_column(String(1024))
    web_url: Mapped[str | None] = mapped_column(String(1024))
    ref_type: Mapped[RefType] = mapped_column(_enum(RefType, "ref_type"))
    ref_name: Mapped[str] = mapped_column(String(255))
    commit_sha: Mapped[str] = mapped_column(String(64))
    before_sha: Mapped[str | None] = mapped_column(String(64))
    commit_message: Mapped[str | None] = mapped_column(Text)
    commit_author: Mapped[str | None] = mapped_column(String(255))
    pusher: Mapped[str | None] = mapped_column(String(255))
    retry_of: Mapped[int | None] = mapped_column(
        Id, ForeignKey("task_details.id", ondelete="SET NULL")
    )
    #: A retry from the failed step: the build whose succeeded steps this one does not run
    #: again (they show as reused).
    reuse_steps_of: Mapped[int | None] = mapped_column(
        Id, ForeignKey("task_details.id", ondelete="SET NULL")
    )
    #: A merge request build: the request's iid (GitHub, Gitea: its number).
    merge_request_iid: Mapped[int | None] = mapped_column(BigInteger)
    #: A merge request build: the project it is into, whose webhook delivered it. When that is
    #: not the built project (a registered fork's request), the build gets no secrets: the
    #: target's secret cannot vouch for another project.
    target_project: Mapped[str | None] = mapped_column(String(255))
    #: A merge request from a fork that is not registered: the fork's path. Such a build
    #: gets no secrets and publishes nothing; its commit comes from ``head_ref``.
    fork_of: Mapped[str | None] = mapped_column(String(255))
    #: The ref of the target repository the commit is fetched from when it is not the
    #: branch's (a fork's ``refs/merge-requests/N/head``, ``refs/pull/N/head``).
    head_ref: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)

    status: Mapped[TaskStatus] = relationship(back_populates="detail", lazy="joined")
    #: Written with the task when its project reports to the forge (loaded only if read).
    commit_statuses: Mapped[list[CommitStatus]] = relationship(passive_deletes=True)

    @property
    def ref(self) -> str:
        """The full git ref, e.g. ``refs/heads/feature/login``."""
        prefix = "refs/heads/" if self.ref_type is RefType.BRANCH else "refs/tags/"
        return prefix + self.ref_name

    @property
    def fetch_ref(self) -> str:
        """The ref the commit is fetched from: a fork's merge request head, else :attr:`ref`."""
        return self.head_ref or self.ref


class TaskStatus(Base):
    """Where the build is: one row per task, kept current by the workers' Celery signals."""

    __tablename__ = "task_states"
    __table_args__ = (Index("ix_task_states_state", "state"), TABLE_ARGS)

    task_id: Mapped[int] = mapped_column(
        Id, ForeignKey("task_details.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[TaskState] = mapped_column(_enum(TaskState, "task_state"))
    stage: Mapped[Stage | None] = mapped_column(_enum(Stage, "task_stage"))
    worker: Mapped[str | None] = mapped_column(String(255))
    queued_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    started_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    #: Runs of this build; a run whose node died is sent again with attempt + 1,
    #: and messages of an older attempt are ignored when they arrive.
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    image: Mapped[str | None] = mapped_column(String(512))
    image_digest: Mapped[str | None] = mapped_column(String(100))
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)

    detail: Mapped[TaskDetail] = relationship(back_populates="status")


class TaskStage(Base):
    """One row per stage that started (or was skipped): the build's timeline."""

    __tablename__ = "task_stages"
    __table_args__ = (TABLE_ARGS,)

    task_id: Mapped[int] = mapped_column(
        Id, ForeignKey("task_details.id", ondelete="CASCADE"), primary_key=True
    )
    stage: Mapped[Stage] = mapped_column(_enum(Stage, "task_stage"), primary_key=True)
    state: Mapped[StageState] = mapped_column(_enum(StageState, "stage_state"))
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class TaskStep(Base):
    """One step of the current run of a build (``ci.yaml``'s ``steps:``, or the one ``build``
    step), in file order: written by the node that runs the build, fenced by ``attempt``."""

    __tablename__ = "task_steps"
    __table_args__ = (TABLE_ARGS,)

    task_id: Mapped[int] = mapped_column(
        Id, ForeignKey("task_details.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[StepState] = mapped_column(_enum(StepState, "step_state"))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    image: Mapped[str | None] = mapped_column(String(512))
    node: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    #: Why it was skipped, or how its failure was taken (``failure: ignore``).
    reason: Mapped[str | None] = mapped_column(Text)


class TaskLog(Base):
    """Build output in chunks, in order of ``id``; read from any host through the database."""

    __tablename__ = "task_logs"
    __table_args__ = (Index("ix_task_logs_task", "task_id", "id"), TABLE_ARGS)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(Id, ForeignKey("task_details.id", ondelete="CASCADE"))
    stage: Mapped[Stage | None] = mapped_column(_enum(Stage, "task_stage"))
    #: The step of the build stage that wrote it (None: the stage's own lines).
    step: Mapped[str | None] = mapped_column(String(64))
    #: The run that wrote it: a run stored only while it is the task's current one.
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    content: Mapped[str] = mapped_column(LongText)


class ApprovalDecision(enum.StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


class TaskApproval(Base):
    """A build waiting for (or given) approval to publish: who decided, when, and where to go on.

    ``context`` is the plain-dict stage context (JSON) the publish stage resumes
    with, on ``node``, the worker that holds the build's workspace.
    """

    __tablename__ = "task_approvals"
    __table_args__ = (TABLE_ARGS,)

    task_id: Mapped[int] = mapped_column(
        Id, ForeignKey("task_details.id", ondelete="CASCADE"), primary_key=True
    )
    node: Mapped[str] = mapped_column(String(255))
    context: Mapped[str] = mapped_column(LongText)
    requested_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    decision: Mapped[ApprovalDecision | None] = mapped_column(
        _enum(ApprovalDecision, "approval_decision")
    )
    decided_by: Mapped[str | None] = mapped_column(String(255))
    decided_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class Project(Base):
    """A project registered on the server: its identity, where it is cloned from, its webhook
    secret and its policy. A webhook only says that a registered project changed.

    ``path`` is ``group/app``, or ``group/*`` for a namespace (a GitLab group
    webhook): then ``clone_url`` is a prefix, and each project's clone URL is it
    plus the project's path. The webhook secret is kept as its SHA-256 (it is
    long and random: shown once, verified, never shown again); git credentials
    of its own are encrypted like secret variables (``CICD_SECRETS_KEY``).
    """

    __tablename__ = "projects"
    __table_args__ = (TABLE_ARGS,)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(255), unique=True)
    forge: Mapped[str] = mapped_column(String(32), default="gitlab")
    #: The forge's id of the project, recorded from its first webhook.
    forge_project_id: Mapped[int | None] = mapped_column(BigInteger)
    clone_url: Mapped[str] = mapped_column(String(1024))
    webhook_secret_sha256: Mapped[str] = mapped_column(String(64))
    #: Forges that sign deliveries (GitHub, Gitea) need the secret itself: kept encrypted.
    webhook_secret_ciphertext: Mapped[str | None] = mapped_column(Text)
    git_username: Mapped[str | None] = mapped_column(String(255))
    git_password_ciphertext: Mapped[str | None] = mapped_column(Text)
    #: Comma-separated ref patterns (fnmatch): builds of these refs get the secret variables.
    protected_refs: Mapped[str] = mapped_column(String(1024), default="main")
    #: Comma-separated ref patterns whose publish waits for a person's approval.
    approval_refs: Mapped[str] = mapped_column(String(1024), default="")
    #: Merge requests from forks that are not registered: ``off`` (not built) or
    #: ``no-secrets`` (built without secrets, publishing nothing).
    fork_mrs: Mapped[str] = mapped_column(String(16), default="off", server_default="off")
    #: The forge's base URL for its API (commit statuses); NULL: the clone URL's origin.
    api_url: Mapped[str | None] = mapped_column(String(1024))
    #: The forge access token that posts commit statuses, encrypted; NULL: no statuses.
    api_token_ciphertext: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class ProjectSecret(Base):
    """A secret variable of one project, encrypted with ``CICD_SECRETS_KEY`` (Fernet)."""

    __tablename__ = "project_secrets"
    __table_args__ = (TABLE_ARGS,)

    project: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(LongText)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class AgentState(Base):
    """One row per worker node, kept current by its heartbeats."""

    __tablename__ = "agent_states"
    __table_args__ = (Index("ix_agent_states_last_heartbeat", "last_heartbeat"), TABLE_ARGS)

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    online: Mapped[bool] = mapped_column(default=True)
    concurrency: Mapped[int] = mapped_column(Integer)
    active: Mapped[int] = mapped_column(Integer, default=0)
    processed: Mapped[int] = mapped_column(BigInteger, default=0)
    loadavg: Mapped[str | None] = mapped_column(String(64))
    sw_version: Mapped[str | None] = mapped_column(String(64))
    first_seen: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    last_heartbeat: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    #: Since when the node has had no broker connection (it takes no builds), else NULL.
    broker_lost_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    #: The registered agent whose database login wrote the last heartbeat (the server's
    #: record of who the node is, not its name); NULL for a node on shared credentials.
    agent: Mapped[str | None] = mapped_column(String(32))


class Agent(Base):
    """A registered agent (``cicd agents add``): a broker user and a database user of its own,
    both named ``account``, whose password (the agent's token) is kept as its SHA-256.

    A disabled agent takes no new builds (its nodes see it within one heartbeat
    and the clone's claim checks it); a revoked one has no credentials left.
    """

    __tablename__ = "agents"
    __table_args__ = (TABLE_ARGS,)

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class CommitStatus(Base):
    """One commit status to post to the forge: the outbox of :mod:`cicd.statuses`.

    A row is written in the transaction of the build's transition that causes
    it, and delivered later, in ``id`` order per task, by the reporter
    (``cicd.reporter``); ``delivered_at`` stays NULL until the forge took it
    (``outcome`` ``posted``), refused it as a repeat (``refused``), it was a
    repeat of what was posted (``skipped``) or it cannot be delivered
    (``error``: ``last_error`` says why). Until then ``next_try_at`` is when it
    is tried (again): it also leases the row to one reporter while it posts.
    """

    __tablename__ = "commit_statuses"
    __table_args__ = (
        Index("ix_commit_statuses_task", "task_id", "id"),
        Index("ix_commit_statuses_undelivered", "delivered_at", "id"),
        TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(Id, ForeignKey("task_details.id", ondelete="CASCADE"))
    #: The status's name on the forge: ``opscd/build``, ``opscd/publish``.
    unit: Mapped[str] = mapped_column(String(64))
    #: pending, running, success, failed or canceled (GitLab's names).
    state: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    tries: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    outcome: Mapped[str | None] = mapped_column(String(16))
    last_error: Mapped[str | None] = mapped_column(Text)


class ProjectCache(Base):
    """One dependency cache (``ci.yaml`` ``cache:``) kept on an agent's disk, in the cache
    store ``store`` (one ``CICD_CACHE_DIR``, which several nodes of a host may share) as
    the file ``digest`` names.

    Written by the node that saved or restored it; the API lists and deletes them.
    A node restores a cache only while its row exists, so deleting a project's rows
    (``cicd cache clear``) clears its caches on every agent at once; the files go at
    their next use or eviction.
    """

    __tablename__ = "project_caches"
    __table_args__ = (Index("ix_project_caches_project", "project"), TABLE_ARGS)

    store: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(255))
    cache_key: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: The node that saved it last, and the build that did.
    node: Mapped[str] = mapped_column(String(255))
    task_id: Mapped[int | None] = mapped_column(Id)
    saved_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    used_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
