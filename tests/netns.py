"""Other hosts on this machine: Linux network namespaces joined to it by veth pairs.

Each :class:`Link` is one "host": a network namespace of its own (``ip netns add``) whose only
interface besides loopback is one end of a veth pair; the other end stays on this machine with the
address the services listen on. Addresses come from 198.18.0.0/15 (RFC 2544, set aside for
benchmarking networks), a /30 per link, so the host can reach nothing else::

    this machine  <host_ip>/30 = ib<tag>h<n>  ====  ib<tag>n<n> = <peer_ip>/30   namespace ib-<tag>-<n>

A process started with :meth:`Link.wrap` runs inside the namespace under a hostname of its own
(``unshare --uts``), so the product sees another host: its lease owners read ``<hostname>:<pid>``.
:meth:`Link.cut` takes the link down (a pulled cable: packets vanish, nothing is refused);
:meth:`Link.close` deletes the pair and the namespace. Everything is also removed at interpreter exit.
"""
from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import subprocess

_links: list["Link"] = []


def missing_prerequisites() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    for tool in ("ip", "unshare", "hostname"):
        if not shutil.which(tool):
            return f"no `{tool}` on PATH"
    probe = f"ib-probe-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip() or result.returncode}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


def _addresses_in_use() -> set[str]:
    text = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    return {word.split("/")[0] for word in text.split() if word.count(".") == 3 and "/" in word}


def free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """``count`` /30s of 198.18.0.0/15 no interface here uses, spread by pid so parallel runs differ."""
    in_use = _addresses_in_use()
    pool = list(ipaddress.ip_network("198.18.0.0/15").subnets(new_prefix=30))
    start = (os.getpid() * 7) % len(pool)
    chosen = []
    for offset in range(len(pool)):
        subnet = pool[(start + offset) % len(pool)]
        if not {str(host) for host in subnet.hosts()} & in_use:
            chosen.append(subnet)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free /30 in 198.18.0.0/15")


class Link:
    """A namespace ("host") with one veth link to this machine; see the module docstring."""

    def __init__(self, index: int, subnet: ipaddress.IPv4Network, hostname: str):
        tag = f"{os.getpid() % 100000:05d}"
        self.netns = f"ib-{tag}-{index}"
        self.host_dev, self.peer_dev = f"ib{tag}h{index}", f"ib{tag}n{index}"  # at most 15 characters
        host_ip, peer_ip = list(subnet.hosts())
        self.host_ip, self.peer_ip = str(host_ip), str(peer_ip)
        self.hostname = hostname
        self.is_up = False
        _links.append(self)
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.peer_dev)
        _ip("link", "set", self.peer_dev, "netns", self.netns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        _ip("addr", "add", f"{self.peer_ip}/30", "dev", self.peer_dev, netns=self.netns)
        _ip("link", "set", "lo", "up", netns=self.netns)
        self.up()

    def up(self) -> None:
        _ip("link", "set", self.host_dev, "up")
        _ip("link", "set", self.peer_dev, "up", netns=self.netns)
        self.is_up = True

    def cut(self) -> None:
        """The cable pulled: the namespace keeps running and keeps its connections, which go nowhere."""
        _ip("link", "set", self.host_dev, "down")
        self.is_up = False

    def wrap(self) -> list[str]:
        """A command prefix that runs the command in the namespace under this link's hostname."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", f'hostname {self.hostname} && exec "$@"', self.hostname]

    def close(self) -> None:
        for command in (["ip", "link", "delete", self.host_dev], ["ip", "netns", "delete", self.netns]):
            subprocess.run(command, capture_output=True, timeout=30)
        if self in _links:
            _links.remove(self)


def close_all() -> None:
    for link in list(_links):
        link.close()


atexit.register(close_all)
