"""Merge request builds and forges that sign their deliveries: a task's merge request, the
project it is into, the fork it comes from and the ref its commit is fetched from; a
project's fork policy and its webhook secret kept encrypted (GitHub and Gitea sign each body
with it, so the server needs the secret itself, not only its digest).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("task_details", sa.Column("merge_request_iid", sa.BigInteger(), nullable=True))
    op.add_column("task_details", sa.Column("target_project", sa.String(length=255), nullable=True))
    op.add_column("task_details", sa.Column("fork_of", sa.String(length=255), nullable=True))
    op.add_column("task_details", sa.Column("head_ref", sa.String(length=255), nullable=True))
    op.add_column(
        "projects",
        sa.Column("fork_mrs", sa.String(length=16), nullable=False, server_default="off"),
    )
    op.add_column("projects", sa.Column("webhook_secret_ciphertext", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("projects", "webhook_secret_ciphertext")
    op.drop_column("projects", "fork_mrs")
    op.drop_column("task_details", "head_ref")
    op.drop_column("task_details", "fork_of")
    op.drop_column("task_details", "target_project")
    op.drop_column("task_details", "merge_request_iid")
