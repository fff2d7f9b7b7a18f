"""``sql/schema.sql`` and the SQLAlchemy models describe the same schema, in real MariaDB."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pymysql
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import ROOT, mysql_connect
from sqlalchemy import create_engine, inspect

from cicd.models import Base

SCHEMA = Path(ROOT, "sql", "schema.sql")


def load_ddl(database: str) -> None:
    connection = mysql_connect(database, client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    with connection, connection.cursor() as cursor:
        cursor.execute(SCHEMA.read_text())
        while cursor.nextset():
            pass


def test_sql_schema_matches_the_models(make_database):
    name, url = make_database("opscd_ddl")
    load_ddl(name)
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
        tables = inspect(connection).get_table_names()
        options = {t: inspect(connection).get_table_options(t) for t in tables}
    engine.dispose()
    assert differences == []
    assert set(tables) == {
        "task_details",
        "task_states",
        "task_stages",
        "task_logs",
        "task_approvals",
        "project_secrets",
        "agent_states",
    }
    for table, opts in options.items():
        assert opts["mysql_default charset"] == "utf8mb4", table
        assert opts["mysql_engine"] == "InnoDB", table


def test_ddl_keeps_delivery_ids_unique(make_database):
    name, _ = make_database("opscd_ddl")
    load_ddl(name)
    connection = mysql_connect(name)
    insert = (
        "INSERT INTO task_details (forge, delivery_id, project, clone_url, ref_type, ref_name,"
        " commit_sha, created_at) VALUES ('gitlab', %s, 'g/p', 'http://x/g/p.git', 'branch',"
        " 'main', %s, NOW(6))"
    )
    with connection, connection.cursor() as cursor:
        cursor.execute(insert, ("uuid-1", "a" * 40))
        cursor.execute(insert, (None, "b" * 40))
        cursor.execute(insert, (None, "c" * 40))  # deliveries without an id are all kept
        try:
            cursor.execute(insert, ("uuid-1", "d" * 40))
        except pymysql.err.IntegrityError as error:
            assert error.args[0] == 1062  # duplicate key
        else:
            raise AssertionError("a repeated delivery id was accepted")


def test_init_db_creates_the_same_schema(make_database):
    _, url = make_database("opscd_initdb")
    env = {"PATH": "/usr/bin:/bin", "CICD_DATABASE_URL": url, "CICD_BROKER_URL": "redis://x"}
    result = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "init-db"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_init_db_upgrades_a_database_of_an_older_version_in_place(make_database):
    """A log written before runs were fenced (no ``task_logs.attempt``) survives the upgrade."""
    name, url = make_database("opscd_upgrade")
    load_ddl(name)
    connection = mysql_connect(name)
    with connection, connection.cursor() as cursor:
        cursor.execute("ALTER TABLE task_logs DROP COLUMN attempt")
        cursor.execute(
            "INSERT INTO task_details (forge, project, clone_url, ref_type, ref_name, commit_sha,"
            " created_at) VALUES ('gitlab', 'old/app', 'http://127.0.0.1:9/a.git', 'branch',"
            " 'main', REPEAT('a', 40), NOW(6))"
        )
        cursor.execute(
            "INSERT INTO task_logs (task_id, created_at, content) VALUES"
            " (LAST_INSERT_ID(), NOW(6), 'an old line')"
        )
        connection.commit()
    env = {"PATH": "/usr/bin:/bin", "CICD_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "init-db"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "adding column task_logs.attempt" in result.stderr
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        rows = connection.exec_driver_sql("SELECT attempt, content FROM task_logs").all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [(1, "an old line")]
