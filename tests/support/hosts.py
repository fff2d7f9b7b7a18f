"""Hosts of a test fleet on one machine: network namespaces on a private /24 joined by a bridge.

Each host is a network namespace (``ip netns``). The control host's namespace
holds the bridge; every other host gets a veth pair to it. Nothing is added
to the machine's own namespace: the test reaches a host's addresses by moving
one thread into that host's namespace (``setns``) for as long as it makes a
connection or binds a listening socket (:meth:`Host.entered`); the socket
stays there afterwards.

Processes of a host start through :meth:`Host.command`: in its network
namespace, in a mount namespace of their own where the fleet's directory
shows only that host's own directory (an agent cannot read the control
host's files), and with a host name of their own (UTS namespace).

Faults: :meth:`Host.cut` drops packets silently with nftables inside the
host's namespace (a partition, or just one port: the broker), :meth:`Host.heal`
removes the rules, :meth:`Host.kill` kills every process in the namespace
(the host dies).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["Network", "Host"]

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
#: The private /24 of every test fleet (each fleet's namespaces are its own: no clash).
SUBNET = "10.213.47"
CUT_TABLE = "opscd_fault"


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Host:
    """One host of the fleet: a network namespace with an address, and a directory of its own."""

    def __init__(self, network: Network, name: str, address: str, root: Path) -> None:
        self.network, self.name, self.address, self.root = network, name, address, root
        self.netns = f"{network.tag}-{name}"
        root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with this thread in the host's network namespace."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.netns}") as there:
            _setns(there.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def inside(self, path: Path) -> Path:
        """What this host's own ``path`` (under :attr:`root`) is called by its processes."""
        return self.network.root / Path(path).relative_to(self.root)

    def port_open(self, port: int) -> bool:
        with self.entered(), socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((self.address, port)) == 0

    def command(self, args: list[str]) -> list[str]:
        """``args`` as run on this host: its network, its own view of the fleet's files, its name.

        Inside, the fleet's directory is this host's directory (bind-mounted over
        it), so paths under it name this host's own disk.
        """
        setup = 'hostname "$0" && mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return [
            "ip", "netns", "exec", self.netns,
            "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", setup, self.name, str(self.root), str(self.network.root), *args,
        ]  # fmt: skip

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args), check=True, capture_output=True, **kwargs)

    def cut(self, peer: Host, port: int | None = None) -> None:
        """Drop every packet between this host and ``peer`` (only to and from ``port`` if given),
        silently, as a cut link or a firewall does: connections hang, nothing is refused."""
        match_out = f"ip daddr {peer.address}" + (f" tcp dport {port}" if port else "")
        match_in = f"ip saddr {peer.address}" + (f" tcp sport {port}" if port else "")
        ruleset = (
            f"table inet {CUT_TABLE} {{\n"
            f"  chain output {{ type filter hook output priority 0; {match_out} drop; }}\n"
            f"  chain input {{ type filter hook input priority 0; {match_in} drop; }}\n"
            "}\n"
        )
        subprocess.run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], input=ruleset,
                       check=True, capture_output=True, text=True)  # fmt: skip

    def heal(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, "nft", "delete", "table", "inet",
                        CUT_TABLE], check=True, capture_output=True)  # fmt: skip

    def pids(self) -> list[int]:
        found = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                               text=True, check=True).stdout.split()  # fmt: skip
        return [int(pid) for pid in found]

    def kill(self) -> None:
        """The host dies: every process in its namespace gets SIGKILL."""
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Network:
    """A bridge in the control host's namespace and the hosts on it; :meth:`close` removes all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)  # empty: each host mounts its own directory here
        self.tag = f"opscd{uuid.uuid4().hex[:6]}"
        self.hosts: list[Host] = []
        self.control = self._add("control", 1)
        _ip("-n", self.control.netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.control.netns, "addr", "add", f"{self.control.address}/24", "dev", "br0")
        _ip("-n", self.control.netns, "link", "set", "br0", "up")

    def _add(self, name: str, number: int) -> Host:
        host = Host(self, name, f"{SUBNET}.{number}", self.root.parent / f"{self.root.name}-{name}")
        _ip("netns", "add", host.netns)
        self.hosts.append(host)
        _ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def add_host(self, name: str) -> Host:
        """A host with a veth pair to the bridge: ``eth0`` on its side."""
        host = self._add(name, 10 + len(self.hosts))
        port = f"p{len(self.hosts)}"
        _ip("link", "add", "eth0", "netns", host.netns, "type", "veth",
            "peer", "name", port, "netns", self.control.netns)  # fmt: skip
        _ip("-n", self.control.netns, "link", "set", port, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        return host

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.kill()
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
