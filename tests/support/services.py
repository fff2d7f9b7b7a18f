"""Private Redis, MariaDB, PostgreSQL and RabbitMQ servers that a test may stop and start, on
loopback ports.

The session's MariaDB and Redis are shared by every test; faults (a restart,
an outage, a password) are rehearsed on servers of the test's own. Given a
``host`` (:mod:`support.hosts`), a server runs on that host of a test fleet,
listening on its address.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .hosts import Host
from .processes import free_port, port_open, wait_until

__all__ = ["PrivateRedis", "PrivateMariaDB", "PrivatePostgreSQL", "PrivateRabbitMQ"]


class _Placed:
    """Where a server runs: this machine's loopback, or a host of a test fleet."""

    host: Host | None = None
    port: int

    @property
    def address(self) -> str:
        return self.host.address if self.host else "127.0.0.1"

    def seen(self, path: Path) -> Path:
        return self.host.inside(path) if self.host else path

    def spawn(self, args: list[str], **kwargs) -> subprocess.Popen:
        args = self.host.command(args) if self.host else args
        return subprocess.Popen(args, start_new_session=True, **kwargs)

    def listening(self) -> bool:
        return self.host.port_open(self.port) if self.host else port_open(self.port)


class PrivateRedis(_Placed):
    """redis-server on a free port; with ``persistent`` its data survives a restart (AOF)."""

    def __init__(
        self, root: Path, password: str | None = None, persistent: bool = True,
        host: Host | None = None,
    ) -> None:  # fmt: skip
        self.root, self.password, self.persistent, self.host = root, password, persistent, host
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.address}:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = ["redis-server", "--bind", self.address, "--port", str(self.port), "--save", "",
                "--protected-mode", "no", "--dir", str(self.seen(self.root)),
                "--logfile", str(self.seen(self.root / "redis.log"))]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = self.spawn(args)
        wait_until(self.listening, 10, "redis to listen")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # redis saves its AOF and exits
            self.process.wait(20)
        self.process = None


class PrivateMariaDB(_Placed):
    """A MariaDB server of its own (datadir in ``root``), root without a password over TCP
    (from the server's own host; :meth:`add_user` for others)."""

    def __init__(self, root: Path, host: Host | None = None) -> None:
        self.root, self.host = root, host
        self.port = free_port()
        self.datadir = root / "data"
        self.process: subprocess.Popen | None = None
        installer = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        subprocess.run(
            [installer, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True,
        )  # fmt: skip

    def url(self, database: str) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{database}?charset=utf8mb4"

    @property
    def socket(self) -> Path:
        """The server's Unix socket: reachable from this machine whatever host it runs on."""
        return self.root / "mysqld.sock"

    def start(self) -> PrivateMariaDB:
        self.process = self.spawn(
            ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.seen(self.datadir)}",
             "--user=root", f"--port={self.port}", f"--bind-address={self.address}",
             f"--socket={self.seen(self.socket)}",
             f"--pid-file={self.seen(self.root / 'mysqld.pid')}",
             "--skip-log-bin", "--innodb-buffer-pool-size=32M"],
            stdout=(self.root / "mysqld.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self.listening, 60, "mariadb to listen")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self.process = None


def _postgresql_bin(tool: str) -> str:
    """A PostgreSQL server tool (``initdb``, ``pg_ctl``): Debian keeps them off the PATH."""
    found = shutil.which(tool)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not found and versions:
        found = str(versions[-1] / tool)
    if not found or not Path(found).exists():
        raise RuntimeError(f"{tool} not found: apt-get install -y postgresql")
    return found


class PrivatePostgreSQL:
    """A PostgreSQL cluster of its own (``initdb`` + ``pg_ctl``) on a free loopback port.

    TCP logins need a password (SCRAM), as on a production server: the
    administrator is ``postgres`` with :attr:`password` (:meth:`url`). The
    server refuses to run as root, so the cluster belongs to the ``postgres``
    system user, in a directory of its own under the system's temporary
    directory (a test's ``tmp_path`` is root's alone).
    """

    def __init__(self, user: str = "postgres") -> None:
        self.user = user
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.root = Path(tempfile.mkdtemp(prefix="opscd-postgresql-"))
        self.datadir = self.root / "data"
        shutil.chown(self.root, user)
        secret = self.root / "password"
        secret.write_text(self.password + "\n")
        shutil.chown(secret, user)
        os.chmod(secret, 0o600)
        self._as_owner(_postgresql_bin("initdb"), "-D", str(self.datadir), "-U", "postgres",
                       "--auth-local=trust", "--auth-host=scram-sha-256",
                       f"--pwfile={secret}", "-E", "UTF8", "--no-sync")  # fmt: skip

    def _as_owner(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", self.user, "--", *args], check=True,
                       capture_output=True, cwd=self.root)  # fmt: skip

    def url(self, database: str, user: str = "postgres", password: str | None = None) -> str:
        return (f"postgresql+psycopg://{user}:{password or self.password}@127.0.0.1:"
                f"{self.port}/{database}")  # fmt: skip

    def start(self) -> PrivatePostgreSQL:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        log = str(self.root / "postgresql.log")
        self._as_owner(_postgresql_bin("pg_ctl"), "-D", str(self.datadir), "-o", options,
                       "-l", log, "-w", "-t", "60", "start")  # fmt: skip
        wait_until(lambda: port_open(self.port), 30, "postgresql to listen")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash (recovery at the next start)."""
        if (self.datadir / "postmaster.pid").exists():
            self._as_owner(_postgresql_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode,
                           "-w", "stop")  # fmt: skip

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRabbitMQ:
    """A RabbitMQ node of its own: its own node name, AMQP and distribution ports (free ones),
    data and log directories, and configuration (``settings``: ``rabbitmq.conf`` lines, e.g.
    ``consumer_timeout = 20000``); no plugins. Login ``guest``/``guest`` from anywhere.

    Never the machine's shared node: a test that restarts the broker restarts this one.
    """

    def __init__(self, root: Path, *settings: str) -> None:
        self.root = root
        self.port, self.dist_port = free_port(), free_port()
        self.name = f"opscd-test-{secrets.token_hex(4)}@localhost"
        self.process: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "rabbitmq.conf").write_text("\n".join(["loopback_users = none", *settings]) + "\n")
        (root / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _environment(self) -> dict[str, str]:
        root = str(self.root)
        return {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": root,  # its own Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",  # not the machine's node's settings
            "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{root}/mnesia", "RABBITMQ_LOG_BASE": f"{root}/log",
            "RABBITMQ_CONFIG_FILE": f"{root}/rabbitmq.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{root}/enabled_plugins",
            "RABBITMQ_PID_FILE": f"{root}/rabbitmq.pid", "ERL_EPMD_ADDRESS": "127.0.0.1",
        }  # fmt: skip

    def start(self) -> PrivateRabbitMQ:
        server = shutil.which("rabbitmq-server", path="/usr/lib/rabbitmq/bin") or shutil.which(
            "rabbitmq-server"
        )
        if server is None:
            raise RuntimeError("rabbitmq-server not found: apt-get install -y rabbitmq-server")
        self.process = subprocess.Popen(
            [server], env=self._environment(), start_new_session=True,
            stdout=(self.root / "server.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

        def listening() -> bool:
            if self.process.poll() is not None:
                log = (self.root / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"rabbitmq-server exited:\n{log}")
            return port_open(self.port)

        wait_until(listening, 90, "rabbitmq to listen")
        return self

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl`` on this node (its own cookie), e.g. ``list_queues name type``."""
        tool = shutil.which("rabbitmqctl", path="/usr/lib/rabbitmq/bin") or "rabbitmqctl"
        done = subprocess.run([tool, "-n", self.name, "-q", *args], env=self._environment(),
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return done.stdout

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the node (SIGTERM: a clean stop that keeps durable queues; SIGKILL: a crash)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(60)
        self.process = None
