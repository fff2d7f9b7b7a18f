"""The schema in real MariaDB and PostgreSQL: ``sql/schema.sql``, the models and the migrations
agree, and a 0.1 database is upgraded in place with its builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pymysql
import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import DATABASES, ROOT, mysql_connect
from sqlalchemy import create_engine, inspect

from cicd.models import Base

SCHEMA = Path(ROOT, "sql", "schema.sql")
#: sql/schema.sql as OpsCD 0.1 shipped it, before migrations (see tests/fixtures/README.md).
OLD_SCHEMA = Path(ROOT, "tests", "fixtures", "schema-0.1.sql")


def load_ddl(database: str, schema: Path = SCHEMA) -> None:
    connection = mysql_connect(database, client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    with connection, connection.cursor() as cursor:
        cursor.execute(schema.read_text())
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
        "task_steps",
        "task_logs",
        "task_approvals",
        "project_secrets",
        "agent_states",
        "agents",
        "commit_statuses",
        "project_caches",
        "projects",
        "alembic_version",
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


@pytest.mark.parametrize("dialect", DATABASES)
def test_init_db_creates_the_same_schema(make_database, dialect):
    _, url = make_database("opscd_initdb", dialect)
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


def test_schema_sql_is_what_the_migrations_generate():
    """``sql/schema.sql`` is generated (``cicd migrate --sql``), never edited by hand."""
    from cicd import migrations

    assert SCHEMA.read_text() == migrations.sql("mysql"), (
        "sql/schema.sql is stale: run  cicd migrate --sql > sql/schema.sql"
    )


def test_the_postgresql_sql_applies_to_an_empty_database_and_matches_the_models(make_database):
    """``cicd migrate --sql --dialect postgresql``, applied as a DBA would."""
    _, url = make_database("opscd_pgsql", "postgresql")
    written = subprocess.run(
        [sys.executable, "-m", "cicd.cli", "migrate", "--sql", "--dialect", "postgresql"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "Apply it to an empty PostgreSQL database" in written.stdout
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(written.stdout.replace("BEGIN;", "").replace("COMMIT;", ""))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == migrations_head()
    engine.dispose()


def fill_with_a_build(database: str) -> int:
    """One finished build with a log line, written as 0.1 wrote them; its id."""
    connection = mysql_connect(database)
    with connection, connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO task_details (forge, project, clone_url, ref_type, ref_name, commit_sha,"
            " commit_message, created_at) VALUES ('gitlab', 'old/app', 'http://127.0.0.1:9/a.git',"
            " 'branch', 'main', REPEAT('a', 40), 'built by 0.1', NOW(6))"
        )
        task_id = cursor.lastrowid
        cursor.execute(
            "INSERT INTO task_states (task_id, state, worker, queued_at, finished_at, exit_code,"
            " attempt, updated_at) VALUES (%s, 'success', 'agent1@old', NOW(6), NOW(6), 0, 1,"
            " NOW(6))", (task_id,),
        )  # fmt: skip
        cursor.execute(
            "INSERT INTO task_logs (task_id, stage, created_at, content) VALUES"
            " (%s, 'build', NOW(6), 'an old line\n')", (task_id,),
        )  # fmt: skip
        connection.commit()
    return task_id


def migrate(url: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CICD_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "cicd.cli", "migrate"], env=env, capture_output=True, text=True
    )


def test_a_0_1_database_is_upgraded_in_place_and_its_builds_stay_readable(make_database, start_web):
    name, url = make_database("opscd_upgrade")
    load_ddl(name, OLD_SCHEMA)
    task_id = fill_with_a_build(name)
    result = migrate(url)
    assert result.returncode == 0, result.stderr
    assert "upgraded from nothing to" in result.stdout
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == migrations_head()
    engine.dispose()
    again = migrate(url)  # nothing left to do, nothing changed
    assert again.returncode == 0 and "database schema is ready (revision" in again.stdout
    web = start_web(CICD_DATABASE_URL=url)
    build = requests.get(f"{web}/api/tasks/{task_id}", timeout=10).json()
    assert build["state"] == "success" and build["project"] == "old/app", build
    assert build["attempt"] == 1
    log = requests.get(f"{web}/api/tasks/{task_id}/log", timeout=10)
    assert log.status_code == 200 and "an old line" in log.text


def test_a_database_of_a_development_build_after_0_1_is_upgraded_too(make_database):
    """``cicd init-db`` of a build between 0.1 and migrations added ``task_logs.attempt``."""
    name, url = make_database("opscd_upgrade_dev")
    load_ddl(name, OLD_SCHEMA)
    fill_with_a_build(name)
    connection = mysql_connect(name)
    with connection, connection.cursor() as cursor:
        cursor.execute("ALTER TABLE task_logs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1")
    result = migrate(url)
    assert result.returncode == 0, result.stderr
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        rows = connection.exec_driver_sql("SELECT attempt, content FROM task_logs").all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [(1, "an old line\n")]


def migrations_head() -> str:
    from cicd import migrations

    return migrations.head()
