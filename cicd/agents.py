"""Registered agents: worker nodes with credentials of their own, which the server can stop.

Until now an agent was whoever held the broker's and the database's
passwords. ``cicd agents add NAME`` (run on the control host with an
administrator's settings: a database login that may create users and grant,
a Redis login that may manage ACL users) makes one account name and one
random token for the agent, and creates with them:

- a **Redis ACL user** confined to OpsCD's keys and channels (those under
  ``CICD_BROKER_PREFIX``), with no administrative or dangerous command
  (``CONFIG``, ``FLUSHALL``, ``KEYS``, ``ACL``, ``CLIENT KILL``, …);
- a **database user** (MariaDB/MySQL; a login role on PostgreSQL) that reads
  OpsCD's schema and writes only the tables a worker writes
  (:data:`WORKER_WRITES`: states, stages, logs, approval requests, heartbeats),
  never projects, secrets or agents.

Only the token's SHA-256 is kept; Redis takes that hash as the password
itself (``#<sha256>``), so ``cicd agents sync`` can make a broker user again
after a Redis restart lost it (Redis keeps ACL users in memory unless it has
an ``aclfile``).

Who a node is, is the account its database session logged in as
(:func:`cicd.db.login`), recorded with each heartbeat in
``agent_states.agent``: the server authenticated it, so a node's name proves
nothing. Once an installation has registered agents, a node with no agent's
login (the shared credentials) takes no builds (:func:`refusal`).

- **disable**: the agent takes no new builds: its nodes see it at their next
  heartbeat and stop consuming the shared queues, and a clone's claim of a
  slot refuses it; builds it runs go on to their end. For maintenance.
- **revoke**: its broker and database users are deleted and their
  connections cut: a node of it cannot take, run or report anything, and its
  builds in flight run again elsewhere once its heartbeats are overdue, as a
  dead node's. For a host that is lost or not trusted any more.

What this does not do: an enabled agent holds ``CICD_SECRETS_KEY`` and reads
every project's encrypted secrets and every build's rows, as any worker does;
the database grants are per table, not per row, so it can write another build's
state. An agent's identity stops work and shows who did what; it is no
sandbox against a malicious enabled agent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from sqlalchemy import String, bindparam, exists, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from cicd import db
from cicd.config import Settings
from cicd.errors import OpsCDError
from cicd.models import Agent, utcnow

__all__ = [
    "AgentError",
    "Issued",
    "NAME",
    "WORKER_WRITES",
    "validate_name",
    "add",
    "set_enabled",
    "revoke",
    "sync",
    "identity",
    "refusal",
    "refusal_of",
    "WHO_AM_I",
    "WHO_AM_I_COLUMNS",
    "broker_view",
]

#: An agent's name: lower-case letters, digits and inner dashes, at most 32 characters.
NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?\Z")
#: The tables a worker node writes; it reads every table of the schema.
WORKER_WRITES = ("task_states", "task_stages", "task_steps", "task_logs", "task_approvals",
                 "agent_states", "commit_statuses", "project_caches")  # fmt: skip
#: A broker prefix usable in an ACL key pattern as it is (no glob characters).
_PREFIX = re.compile(r"[A-Za-z0-9._:/-]+\Z")
#: Redis refuses these to an agent: no server administration, nothing that scans or wipes.
_ACL_COMMANDS = ("+@all", "-@admin", "-@dangerous")


class AgentError(OpsCDError):
    """An agent could not be added, changed or found; the message says why."""


@dataclasses.dataclass(frozen=True)
class Issued:
    """A new agent's credentials, shown once: the settings its worker nodes start with."""

    name: str
    account: str
    token: str

    def environment(self, settings: Settings) -> dict[str, str]:
        """The agent's settings: the control host's database and broker, with its own login.

        Hosts are the ones this process uses: an agent on another host may need
        the control host's address instead of a loopback one.
        """
        database = make_url(settings.database_url or "").set(
            username=self.account, password=self.token
        )
        parts = urlsplit(settings.broker_url or "")
        host = parts.hostname or "127.0.0.1"
        netloc = f"{quote(self.account, safe='')}:{quote(self.token, safe='')}@{host}"
        port = f":{parts.port}" if parts.port else ""
        broker = urlunsplit(parts._replace(netloc=netloc + port))
        return {
            "CICD_AGENT_NAME": self.name,
            "CICD_DATABASE_URL": database.render_as_string(hide_password=False),
            "CICD_BROKER_URL": broker,
        }


def validate_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise AgentError(
            f"{name!r} is no agent name: use 1 to 32 lower-case letters, digits and dashes "
            "(not first or last), e.g. build-host-1"
        )
    return name


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _found(session: Session, name: str) -> Agent:
    agent = session.get(Agent, validate_name(name), with_for_update=True)
    if agent is None or agent.revoked_at is not None:
        raise AgentError(f"no agent {name!r} is registered: see `cicd agents`")
    return agent


def add(session: Session, settings: Settings, name: str) -> tuple[Issued, list[str]]:
    """Register ``name`` with a broker user and a database user of its own, and commit.

    Returns the credentials (shown once) and warnings for the operator. A
    revoked agent's name may be used again; it gets a new account.
    """
    validate_name(name)
    _check_broker(settings)
    existing = session.get(Agent, name, with_for_update=True)
    if existing is not None and existing.revoked_at is None:
        raise AgentError(f"agent {name!r} is registered already (`cicd agents revoke` it first)")
    token = secrets.token_urlsafe(32)
    # A new account each time: a revoked agent's old token must never work again.
    issued = Issued(name=name, account=f"opscd-{name}-{secrets.token_hex(3)}", token=token)
    # CREATE USER commits implicitly (MySQL), so the users come first and the row last
    # (PostgreSQL's CREATE ROLE is part of the transaction).
    _create_database_user(session, issued.account, token)
    try:
        warnings = _set_broker_user(settings, issued.account, _digest(token))
        existing = session.get(Agent, name, with_for_update=True)
        if existing is not None and existing.revoked_at is None:
            raise AgentError(f"agent {name!r} was registered meanwhile")
        if existing is not None:
            session.delete(existing)
            session.flush()
        session.add(Agent(name=name, account=issued.account, token_sha256=_digest(token),
                          enabled=True, created_at=utcnow()))  # fmt: skip
        session.commit()
    except BaseException:
        session.rollback()  # on PostgreSQL, the new role with it
        _drop_database_user(session, issued.account)
        session.commit()
        try:
            _delete_broker_user(settings, issued.account)
        except AgentError:
            pass
        raise
    return issued, warnings


def set_enabled(session: Session, name: str, enabled: bool) -> Agent:
    """Enable or disable an agent (see the module doc) and commit."""
    agent = _found(session, name)
    if agent.enabled != enabled:
        agent.enabled, agent.disabled_at = enabled, None if enabled else utcnow()
    session.commit()
    return agent


def revoke(session: Session, settings: Settings, name: str) -> tuple[Agent, list[str]]:
    """Delete the agent's broker and database users, cut their connections, and commit."""
    agent = _found(session, name)
    agent.enabled, agent.revoked_at = False, utcnow()
    agent.disabled_at = agent.disabled_at or agent.revoked_at
    warnings = _delete_broker_user(settings, agent.account)
    _drop_database_user(session, agent.account)
    session.commit()
    _cut_connections(session, agent.account)
    session.commit()
    return agent, warnings


def sync(session: Session, settings: Settings) -> tuple[list[str], list[str]]:
    """Make every registered agent's broker user and grants again, as they should be (after a
    Redis restart without an ``aclfile``, or a migration that added a table)."""
    warnings: dict[str, None] = {}
    names = []
    for agent in session.scalars(select(Agent).where(Agent.revoked_at.is_(None))).all():
        warnings.update(dict.fromkeys(_set_broker_user(settings, agent.account,
                                                       agent.token_sha256)))  # fmt: skip
        _grant(session, agent.account)
        names.append(agent.name)
    session.commit()
    return names, list(warnings)


def identity(session: Session) -> Agent | None:
    """The registered agent this session's database login belongs to, if any."""
    account = db.login(session)
    return session.scalar(select(Agent).where(Agent.account == account)) if account else None


def refusal(session: Session, agent: Agent | None) -> str | None:
    """Why the node whose login is ``agent``'s (:func:`identity`) may start no build, or None."""
    if agent is not None:
        return refusal_of(agent.name, agent.enabled, True)
    registered = session.scalar(select(Agent.name).where(Agent.revoked_at.is_(None)).limit(1))
    return refusal_of(None, False, registered is not None)


def refusal_of(name: str | None, enabled: bool, registered: bool) -> str | None:
    """:func:`refusal` from what a query read: the login's agent (``name``, None for none) and
    whether it is enabled, and whether this server has any agent registered."""
    if name is not None:
        return None if enabled else f"agent {name} is disabled"
    if not registered:
        return None  # no agent registered: every node on the shared credentials builds
    return (
        "its database login is no registered agent's, and this server has registered "
        "agents: start it with the settings of `cicd agents add`"
    )


#: What :func:`refusal_of` needs, as columns of one query (or of an UPDATE's RETURNING): the
#: name of the agent whose account is the ``account`` parameter, whether it is enabled, and
#: whether any agent is registered.
WHO_AM_I_COLUMNS = (
    select(Agent.name).where(Agent.account == bindparam("account")).scalar_subquery(),
    select(Agent.enabled).where(Agent.account == bindparam("account")).scalar_subquery(),
    exists().where(Agent.revoked_at.is_(None)),
)
WHO_AM_I = select(*WHO_AM_I_COLUMNS)


# --- the database user ------------------------------------------------------------------------


def _dialect(session: Session) -> str:
    name = session.get_bind().dialect.name
    if name not in ("mysql", "mariadb", "postgresql"):
        raise AgentError(
            f"agent database users are made on MariaDB/MySQL and PostgreSQL only, not {name}"
        )
    return name


def _quote(session: Session) -> Callable[[str], str]:
    return session.get_bind().dialect.identifier_preparer.quote


def _create_database_user(session: Session, account: str, token: str) -> None:
    if _dialect(session) == "postgresql":
        # DDL takes no bound parameters on PostgreSQL: the token (URL-safe base64 from
        # secrets.token_urlsafe) goes in as a quoted literal, the account as an identifier.
        literal = String().literal_processor(session.get_bind().dialect)
        session.execute(text(f"CREATE ROLE {_quote(session)(account)} LOGIN "
                             f"PASSWORD {literal(token)}"))  # fmt: skip
    else:
        session.execute(text("CREATE USER :account@'%' IDENTIFIED BY :token"),
                        {"account": account, "token": token})  # fmt: skip
    _grant(session, account)


def _grant(session: Session, account: str) -> None:
    quote_name = _quote(session)
    if _dialect(session) == "postgresql":
        _grant_postgresql(session, quote_name(account))
        return
    schema = quote_name(session.get_bind().url.database or "")
    who = {"account": account}
    session.execute(text(f"GRANT SELECT ON {schema}.* TO :account@'%'"), who)
    for table in WORKER_WRITES:
        session.execute(
            text(f"GRANT INSERT, UPDATE, DELETE ON {schema}.{quote_name(table)} TO :account@'%'"),
            who,
        )


def _grant_postgresql(session: Session, role: str) -> None:
    """The same rights on PostgreSQL: read every table of OpsCD's schema, write the workers'
    tables, and draw ids from those tables' own sequences (an INSERT needs them)."""
    quote_name = _quote(session)
    database = quote_name(session.get_bind().url.database or "")
    schema = quote_name(session.execute(text("SELECT current_schema()")).scalar_one())
    session.execute(text(f"GRANT CONNECT ON DATABASE {database} TO {role}"))
    session.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {role}"))
    session.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}"))
    tables = ", ".join(quote_name(table) for table in WORKER_WRITES)
    session.execute(text(f"GRANT INSERT, UPDATE, DELETE ON {tables} TO {role}"))
    sequences = session.scalars(
        text("SELECT sequence.relname FROM pg_class sequence"
             " JOIN pg_depend owned ON owned.objid = sequence.oid AND owned.deptype = 'a'"
             " JOIN pg_class owner ON owner.oid = owned.refobjid"
             " WHERE sequence.relkind = 'S' AND owner.relname IN :tables"
             " AND owner.relnamespace = current_schema()::regnamespace")
        .bindparams(bindparam("tables", expanding=True)),
        {"tables": list(WORKER_WRITES)},
    ).all()  # fmt: skip
    if sequences:
        names = ", ".join(quote_name(sequence) for sequence in sequences)
        session.execute(text(f"GRANT USAGE, SELECT ON SEQUENCE {names} TO {role}"))


def _drop_database_user(session: Session, account: str) -> None:
    """Delete the account, its grants with it (:func:`_cut_connections` after the commit)."""
    if _dialect(session) == "postgresql":
        if session.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :account"),
                          {"account": account}):  # fmt: skip
            role = _quote(session)(account)
            session.execute(text(f"DROP OWNED BY {role}"))  # its grants, so that it can go
            session.execute(text(f"DROP ROLE {role}"))
        return
    session.execute(text("DROP USER IF EXISTS :account@'%'"), {"account": account})


def _cut_connections(session: Session, account: str) -> None:
    """End the sessions the (dropped and committed) account still has open: they would go
    on with the rights they had."""
    if _dialect(session) == "postgresql":
        session.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE usename = :account"), {"account": account})  # fmt: skip
        return
    sessions = session.scalars(
        text("SELECT id FROM information_schema.processlist WHERE user = :account"),
        {"account": account},
    ).all()
    for connection in sessions:
        try:
            session.execute(text(f"KILL CONNECTION {int(connection)}"))
        except Exception:  # noqa: S110 (it ended meanwhile)
            pass


# --- the broker user --------------------------------------------------------------------------


def _check_broker(settings: Settings) -> str:
    settings.require("broker_url")
    scheme = urlsplit(settings.broker_url or "").scheme
    if scheme not in ("redis", "rediss"):
        raise AgentError(f"agent broker users are made on Redis only, not {scheme}://")
    prefix = settings.broker_prefix
    if not _PREFIX.match(prefix):
        raise AgentError(
            "agents are confined to OpsCD's keys in Redis by CICD_BROKER_PREFIX, which is "
            f"{prefix!r}: set it (e.g. opscd:, letters, digits and . _ : / -) on every OpsCD "
            "process first; builds queued under the old keys must finish before the change"
        )
    return prefix


def _database_number(settings: Settings) -> int:
    path = urlsplit(settings.broker_url or "").path.strip("/")
    return int(path) if path.isdigit() else 0


def _admin(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url or "", socket_timeout=5,
                                socket_connect_timeout=5)  # fmt: skip


def _persisted(client: redis.Redis) -> list[str]:
    """Save the ACL if Redis has a file for it; else say that a restart forgets the users."""
    try:
        if client.config_get("aclfile").get("aclfile"):
            client.acl_save()
            return []
    except redis.RedisError as error:
        return [f"could not save Redis's ACL file ({error}): after a Redis restart, run "
                "`cicd agents sync`"]  # fmt: skip
    return ["this Redis has no aclfile, so it keeps agent users in memory only: after a "
            "Redis restart, run `cicd agents sync` (or configure aclfile)"]  # fmt: skip


def _set_broker_user(settings: Settings, account: str, token_sha256: str) -> list[str]:
    prefix = _check_broker(settings)
    # PSUBSCRIBE needs its pattern itself among the user's: kombu's fanout channels are
    # "<prefix>/<db>.<exchange>" (remote control), Celery's gossip "…celeryev/worker.*".
    fanout = f"{prefix}/{_database_number(settings)}."
    patterns = [f"&{prefix}*", f"&{fanout}celery.pidbox", f"&{fanout}celeryev/worker.*"]
    rules = ["reset", "on", f"#{token_sha256}", f"~{prefix}*", *patterns, *_ACL_COMMANDS]
    try:
        with _admin(settings) as client:
            client.execute_command("ACL", "SETUSER", account, *rules)
            return _persisted(client)
    except redis.RedisError as error:
        raise AgentError(f"could not make the agent's Redis user: {error}") from None


def _delete_broker_user(settings: Settings, account: str) -> list[str]:
    _check_broker(settings)
    try:
        with _admin(settings) as client:
            client.execute_command("ACL", "DELUSER", account)  # also disconnects its clients
            return _persisted(client)
    except redis.RedisError as error:
        raise AgentError(f"could not delete the agent's Redis user: {error}") from None


def broker_view(settings: Settings, accounts: set[str]) -> dict[str, Any] | None:
    """What Redis knows of the agents: which of ``accounts`` it has a user for, and the logins
    it refused lately (wrong token, revoked or unknown agent account), from its ACL log.

    None when this process may not ask (no Redis broker, no right to ``ACL``).
    """
    if urlsplit(settings.broker_url or "").scheme not in ("redis", "rediss"):
        return None
    try:
        with redis.Redis.from_url(settings.broker_url or "", socket_timeout=1,
                                  socket_connect_timeout=1) as client:  # fmt: skip
            users = {name.decode() if isinstance(name, bytes) else name
                     for name in client.execute_command("ACL", "USERS")}  # fmt: skip
            entries = client.acl_log(count=128)
    except redis.RedisError:
        return None
    refused = []
    for entry in entries:
        username = str(entry.get("username", ""))
        if entry.get("reason") != "auth" or not (
            username in accounts or username.startswith("opscd-")
        ):
            continue
        client = entry.get("client-info")  # redis-py parses it into a dict
        address = client.get("addr") if isinstance(client, dict) else None
        refused.append({
            "account": username,
            "count": int(entry.get("count", 1)),
            "seconds_ago": float(entry.get("age-seconds", 0)),
            "address": address,
        })  # fmt: skip
    return {"accounts": accounts & users, "refused": refused}
