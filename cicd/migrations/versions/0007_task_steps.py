"""Pipelines of steps: one ``task_steps`` row per step of a build's current run, the step
each log chunk belongs to (``task_logs.step``), and the build whose succeeded steps a retry
from the failed step reuses (``task_details.reuse_steps_of``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
STATES = ("queued", "running", "success", "failed", "skipped", "canceled")


def upgrade() -> None:
    op.create_table(
        "task_steps",
        sa.Column("task_id", ID, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.Enum(*STATES, name="step_state", length=16), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("image", sa.String(length=512), nullable=True),
        sa.Column("node", sa.String(length=255), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["task_details.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id", "name"),
        **TABLE,
    )
    op.add_column("task_logs", sa.Column("step", sa.String(length=64), nullable=True))
    # In a batch: SQLite (``cicd up``) adds a foreign key only by copying the table.
    with op.batch_alter_table("task_details") as table:
        table.add_column(sa.Column("reuse_steps_of", ID, nullable=True))
        table.create_foreign_key(
            "fk_task_details_reuse_steps_of", "task_details", ["reuse_steps_of"], ["id"],
            ondelete="SET NULL",
        )  # fmt: skip


def downgrade() -> None:
    with op.batch_alter_table("task_details") as table:
        table.drop_constraint("fk_task_details_reuse_steps_of", type_="foreignkey")
        table.drop_column("reuse_steps_of")
    op.drop_column("task_logs", "step")
    op.drop_table("task_steps")
