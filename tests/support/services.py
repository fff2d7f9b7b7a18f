"""Private Redis and MariaDB servers that a test may stop and start, on loopback ports.

The session's MariaDB and Redis are shared by every test; faults (a restart,
an outage, a password) are rehearsed on servers of the test's own.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from .processes import free_port, port_open, wait_until

__all__ = ["PrivateRedis", "PrivateMariaDB"]


class PrivateRedis:
    """redis-server on a free port; with ``persistent`` its data survives a restart (AOF)."""

    def __init__(self, root: Path, password: str | None = None, persistent: bool = True) -> None:
        self.root, self.password, self.persistent = root, password, persistent
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--dir", str(self.root), "--logfile", str(self.root / "redis.log")]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, start_new_session=True)
        wait_until(lambda: port_open(self.port), 10, "redis to listen")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # redis saves its AOF and exits
            self.process.wait(20)
        self.process = None


class PrivateMariaDB:
    """A MariaDB server of its own (datadir in ``root``), root without a password over TCP."""

    def __init__(self, root: Path) -> None:
        self.root = root
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

    def start(self) -> PrivateMariaDB:
        self.process = subprocess.Popen(
            ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--socket={self.root / 'mysqld.sock'}", f"--pid-file={self.root / 'mysqld.pid'}",
             "--skip-log-bin", "--innodb-buffer-pool-size=32M"],
            stdout=(self.root / "mysqld.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_until(lambda: port_open(self.port), 60, "mariadb to listen")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self.process = None
