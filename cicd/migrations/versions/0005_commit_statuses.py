"""Commit statuses to the forge: a project's API URL and encrypted token, and the outbox of
statuses to post (``commit_statuses``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.add_column("projects", sa.Column("api_url", sa.String(length=1024), nullable=True))
    op.add_column("projects", sa.Column("api_token_ciphertext", sa.Text(), nullable=True))
    op.create_table(
        "commit_statuses",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("task_id", ID, nullable=False),
        sa.Column("unit", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("next_try_at", TIMESTAMP, nullable=True),
        sa.Column("delivered_at", TIMESTAMP, nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["task_details.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        **TABLE,
    )
    op.create_index("ix_commit_statuses_task", "commit_statuses", ["task_id", "id"])
    op.create_index("ix_commit_statuses_undelivered", "commit_statuses", ["delivered_at", "id"])


def downgrade() -> None:
    op.drop_table("commit_statuses")
    op.drop_column("projects", "api_token_ciphertext")
    op.drop_column("projects", "api_url")
