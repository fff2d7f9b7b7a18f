"""Dependency caches: one ``project_caches`` row per cache an agent keeps on its disk
(``ci.yaml`` ``cache:``), so the API can list them and clear a project's on every agent.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "project_caches",
        sa.Column("store", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=255), nullable=False),
        sa.Column("cache_key", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("task_id", ID, nullable=True),
        sa.Column("saved_at", TIMESTAMP, nullable=False),
        sa.Column("used_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("store", "digest"),
        **TABLE,
    )
    op.create_index("ix_project_caches_project", "project_caches", ["project"])


def downgrade() -> None:
    op.drop_index("ix_project_caches_project", table_name="project_caches")
    op.drop_table("project_caches")
