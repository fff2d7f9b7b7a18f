"""Alembic's environment: the migrations run on the connection :mod:`cicd.migrations` gives
them (online), or are written out as SQL for a dialect (offline, ``cicd migrate --sql``)."""

from __future__ import annotations

from alembic import context

from cicd.models import Base

config = context.config

if context.is_offline_mode():
    context.configure(
        dialect_name=config.attributes["dialect"],
        target_metadata=Base.metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    context.configure(
        connection=config.attributes["connection"], target_metadata=Base.metadata,
        transaction_per_migration=True,
    )  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()
