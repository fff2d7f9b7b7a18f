"""Registered projects: identity, clone URL, webhook secret, git credentials and ref policy.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("forge", sa.String(length=32), nullable=False),
        sa.Column("forge_project_id", sa.BigInteger(), nullable=True),
        sa.Column("clone_url", sa.String(length=1024), nullable=False),
        sa.Column("webhook_secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("git_username", sa.String(length=255), nullable=True),
        sa.Column("git_password_ciphertext", sa.Text(), nullable=True),
        sa.Column("protected_refs", sa.String(length=1024), nullable=False),
        sa.Column("approval_refs", sa.String(length=1024), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("path"),
        **TABLE,
    )


def downgrade() -> None:
    op.drop_table("projects")
