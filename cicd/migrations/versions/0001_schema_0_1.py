"""The schema of OpsCD 0.1 as released: builds, their states, stages, logs, approvals, secrets
and agents.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
TABLES = ("task_states", "task_stages", "task_logs", "task_approvals", "task_details",
          "project_secrets", "agent_states")  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "agent_states",
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("active", sa.Integer(), nullable=False),
        sa.Column("processed", sa.BigInteger(), nullable=False),
        sa.Column("loadavg", sa.String(length=64), nullable=True),
        sa.Column("sw_version", sa.String(length=64), nullable=True),
        sa.Column("first_seen", TIMESTAMP, nullable=False),
        sa.Column("last_heartbeat", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("hostname"),
        **TABLE,
    )
    op.create_index(
        "ix_agent_states_last_heartbeat", "agent_states", ["last_heartbeat"], unique=False
    )
    op.create_table(
        "project_secrets",
        sa.Column("project", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("ciphertext", LONG_TEXT, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("project", "name"),
        **TABLE,
    )
    op.create_table(
        "task_details",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("forge", sa.String(length=32), nullable=False),
        sa.Column("delivery_id", sa.String(length=128), nullable=True),
        sa.Column("project", sa.String(length=255), nullable=False),
        sa.Column("clone_url", sa.String(length=1024), nullable=False),
        sa.Column("web_url", sa.String(length=1024), nullable=True),
        sa.Column("ref_type", sa.Enum("branch", "tag", name="ref_type", length=16), nullable=False),
        sa.Column("ref_name", sa.String(length=255), nullable=False),
        sa.Column("commit_sha", sa.String(length=64), nullable=False),
        sa.Column("before_sha", sa.String(length=64), nullable=True),
        sa.Column("commit_message", sa.Text(), nullable=True),
        sa.Column("commit_author", sa.String(length=255), nullable=True),
        sa.Column("pusher", sa.String(length=255), nullable=True),
        sa.Column("retry_of", ID, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["retry_of"], ["task_details.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("forge", "delivery_id", name="uq_task_details_delivery"),
        **TABLE,
    )
    op.create_index(
        "ix_task_details_project_ref", "task_details", ["project", "ref_name"], unique=False
    )
    op.create_table(
        "task_approvals",
        sa.Column("task_id", ID, nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("context", LONG_TEXT, nullable=False),
        sa.Column("requested_at", TIMESTAMP, nullable=False),
        sa.Column(
            "decision",
            sa.Enum("approved", "rejected", name="approval_decision", length=16),
            nullable=True,
        ),
        sa.Column("decided_by", sa.String(length=255), nullable=True),
        sa.Column("decided_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["task_details.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id"),
        **TABLE,
    )
    op.create_table(
        "task_logs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("task_id", ID, nullable=False),
        sa.Column(
            "stage",
            sa.Enum("clone", "build", "publish", name="task_stage", length=16),
            nullable=True,
        ),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("content", LONG_TEXT, nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["task_details.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        **TABLE,
    )
    op.create_index("ix_task_logs_task", "task_logs", ["task_id", "id"], unique=False)
    op.create_table(
        "task_stages",
        sa.Column("task_id", ID, nullable=False),
        sa.Column(
            "stage",
            sa.Enum("clone", "build", "publish", name="task_stage", length=16),
            nullable=False,
        ),
        sa.Column(
            "state",
            sa.Enum(
                "running", "success", "failed", "skipped", "canceled", name="stage_state", length=16
            ),
            nullable=False,
        ),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["task_details.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id", "stage"),
        **TABLE,
    )
    op.create_table(
        "task_states",
        sa.Column("task_id", ID, nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "queued",
                "running",
                "waiting",
                "success",
                "failed",
                "canceled",
                name="task_state",
                length=16,
            ),
            nullable=False,
        ),
        sa.Column(
            "stage",
            sa.Enum("clone", "build", "publish", name="task_stage", length=16),
            nullable=True,
        ),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("queued_at", TIMESTAMP, nullable=False),
        sa.Column("enqueued_at", TIMESTAMP, nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default="1", nullable=False),
        sa.Column("image", sa.String(length=512), nullable=True),
        sa.Column("image_digest", sa.String(length=100), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["task_details.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id"),
        **TABLE,
    )
    op.create_index("ix_task_states_state", "task_states", ["state"], unique=False)


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
