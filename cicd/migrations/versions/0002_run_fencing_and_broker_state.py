"""Log lines carry their run (``task_logs.attempt``), agents say since when they have no broker
(``agent_states.broker_lost_at``).

Databases made by development builds after 0.1 (``cicd init-db`` then added
columns in place) may have ``task_logs.attempt`` already: a column that is
there is left alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
COLUMNS = {
    "task_logs": sa.Column("attempt", sa.Integer(), server_default="1", nullable=False),
    "agent_states": sa.Column("broker_lost_at", TIMESTAMP, nullable=True),
}


def _has(table: str, column: str) -> bool:
    if op.get_context().as_sql:  # writing SQL for a DBA: the database is not there to ask
        return False
    return column in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    for table, column in COLUMNS.items():
        if not _has(table, column.name):
            op.add_column(table, column)


def downgrade() -> None:
    for table, column in COLUMNS.items():
        op.drop_column(table, column.name)
