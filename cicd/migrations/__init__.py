"""The schema's history: Alembic migrations (``versions/``) are the source of every table.

:func:`upgrade` brings a database to the newest revision (``cicd migrate``;
``cicd init-db`` is the same): an empty database gets every table; a database
made before migrations existed (0.1's ``sql/schema.sql``, or ``create_all``)
is recognised by its tables, recorded as revision 0001 (0.1 as released) and
upgraded from there, its rows untouched. :func:`sql` writes the migrations out
as SQL for a DBA who applies SQL by hand: ``sql/schema.sql`` is that output for
MariaDB, and a test fails when it is stale.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

__all__ = ["BASELINE", "upgrade", "current", "head", "sql"]

log = logging.getLogger(__name__)

#: The revision that is OpsCD 0.1's schema, as ``sql/schema.sql`` shipped it.
BASELINE = "0001"


def _config(**attributes: object) -> Config:
    config = Config(output_buffer=attributes.pop("output", None))
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes.update(attributes)
    return config


def head() -> str:
    """The newest revision."""
    return ScriptDirectory.from_config(_config()).get_current_head() or BASELINE


def current(engine: Engine) -> str | None:
    """The database's revision; None for a database no migration has run on."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to :func:`head`; returns (the revision it was at, the one it is at)."""
    with engine.begin() as connection:
        config = _config(connection=connection)
        before = MigrationContext.configure(connection).get_current_revision()
        if before is None and "task_details" in inspect(connection).get_table_names():
            log.warning("a database from before migrations: recording it as %s", BASELINE)
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
    return before, head()


SQL_HEADER = """\
-- OpsCD's schema, generated from its migrations (cicd/migrations) by:
--   cicd migrate --sql{option} > {file}
-- Apply it to an empty {database} database: {client}
-- To upgrade a database in place, run `cicd migrate` (it keeps every row).
"""


_CLIENTS = {
    "mysql": {
        "database": "MariaDB/MySQL",
        "client": "mysql opscd < sql/schema.sql",
        "option": "",
        "file": "sql/schema.sql",
    },
    "postgresql": {
        "database": "PostgreSQL",
        "client": "psql -d opscd -f schema.sql",
        "option": " --dialect postgresql",
        "file": "schema.sql",
    },
}


def sql(dialect: str = "mysql") -> str:
    """Every migration as SQL for ``dialect``, from an empty database to :func:`head`."""
    output = io.StringIO()
    command.upgrade(_config(dialect=dialect, output=output), "head", sql=True)
    header = SQL_HEADER.format(**_CLIENTS[dialect])
    return header + "".join(line.rstrip() + "\n" for line in output.getvalue().splitlines())
