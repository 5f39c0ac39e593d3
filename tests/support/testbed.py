"""Test hosts in network namespaces: every node of a federation on a host of its own.

Each host is a network namespace with one address on 198.19.<subnet>.0/24 (RFC 2544's benchmark range,
198.18.0.0/15) and a name that every host resolves (``/etc/netns/<namespace>/hosts``, which ``ip netns exec``
puts over ``/etc/hosts``). The hosts are joined by a bridge in a namespace of its own with no route out, so
nothing reaches or leaves the machine's own network. A host's link can be cut and restored, and a host can
get a firewall (nftables) that opens only given TCP ports. Needs root and iproute2 (``can_make_namespaces``),
and ``nft`` for the firewall; standard library only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def can_make_namespaces() -> bool:
    """Whether this process may build network namespaces (root, with iproute2's ``ip``)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


class TestbedError(RuntimeError):
    """A namespace, link or firewall could not be set up; the message names the command."""


@dataclass(frozen=True)
class Host:
    """One test host: its DNS ``name``, its ``namespace``, its ``address`` and the bridge side of its link."""

    name: str
    namespace: str
    address: str
    port: str


def _run(argv: Sequence[str], stdin: str | None = None) -> None:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


class Testbed:
    """Hosts named ``names`` (e.g. ``director.hq.test``) in namespaces of their own, joined by a bridge.

    ``tag`` (default from the process id) names the namespaces and links, and ``subnet`` (default from the
    process id) the /24, so that two runs on one machine stay apart. ``aliases``: per host, names it resolves
    to another host's address instead of their own (e.g. ``{site: {director: relay}}`` puts a relay between a
    site and the director). Use it as a context manager: leaving it deletes every namespace, link and hosts
    file it made.
    """

    def __init__(
        self,
        names: Sequence[str],
        tag: str | None = None,
        subnet: int | None = None,
        aliases: dict[str, dict[str, str]] | None = None,
    ) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names {list(names)}: give at least one, each once")
        self.tag = tag or f"tb{os.getpid() % 100000}"
        self.subnet = (20 + os.getpid() % 230) if subnet is None else subnet
        self.bridge = f"{self.tag}br"
        self.hosts = {
            name: Host(name, f"{self.tag}h{i}", f"198.19.{self.subnet}.{i + 1}", f"{self.tag}b{i}")
            for i, name in enumerate(names, start=1)
        }
        self.aliases = aliases or {}
        named = {n for host, mapping in self.aliases.items() for n in (host, *mapping, *mapping.values())}
        if named - set(names):
            raise ValueError(f"aliases name hosts that are not in the testbed: {sorted(named - set(names))}")

    def hosts_file(self, host: str) -> str:
        """The /etc/hosts that ``host`` sees: every host's name and address, with its aliases applied."""
        mapping = self.aliases.get(host, {})
        lines = (f"{self.hosts[mapping.get(name, name)].address} {name}\n" for name in self.hosts)
        return "127.0.0.1 localhost\n" + "".join(lines)

    def __enter__(self) -> Testbed:
        self.__exit__()
        try:
            _run(["ip", "netns", "add", self.bridge])
            _run(["ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.bridge, "link", "set", "br0", "up"])
            for i, host in enumerate(self.hosts.values(), start=1):
                inner = f"{self.tag}v{i}"
                _run(["ip", "netns", "add", host.namespace])
                _run(["ip", "link", "add", inner, "type", "veth", "peer", "name", host.port])
                _run(["ip", "link", "set", inner, "netns", host.namespace])
                _run(["ip", "link", "set", host.port, "netns", self.bridge])
                _run(["ip", "-n", self.bridge, "link", "set", host.port, "master", "br0"])
                _run(["ip", "-n", self.bridge, "link", "set", host.port, "up"])
                _run(["ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inner])
                _run(["ip", "-n", host.namespace, "link", "set", inner, "up"])
                _run(["ip", "-n", host.namespace, "link", "set", "lo", "up"])
                folder = NETNS_ETC / host.namespace
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "hosts").write_text(self.hosts_file(host.name))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, timeout=30)
            shutil.rmtree(NETNS_ETC / host.namespace, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.bridge], capture_output=True, timeout=30)

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host`` (in its namespace, with its hosts file)."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *argv]

    def cut(self, host: str) -> None:
        """Take ``host``'s link down: it reaches no other host and no other host reaches it."""
        _run(["ip", "-n", self.bridge, "link", "set", self.hosts[host].port, "down"])

    def restore(self, host: str) -> None:
        """Bring ``host``'s link up again."""
        _run(["ip", "-n", self.bridge, "link", "set", self.hosts[host].port, "up"])

    def firewall(self, host: str, tcp_ports: Sequence[int]) -> None:
        """Let ``host`` accept only connections to ``tcp_ports`` (and its own loopback, and the replies to its own
        connections); anything else sent to it is dropped."""
        if shutil.which("nft") is None:
            raise TestbedError("nft (Debian's nftables) is not installed: no firewall")
        ports = ", ".join(str(int(port)) for port in tcp_ports)
        rules = (
            "table inet testbed {\n  chain input {\n    type filter hook input priority 0; policy drop;\n"
            "    ct state established,related accept\n    iif lo accept\n"
            f"    tcp dport {{ {ports} }} accept\n  }}\n}}\n"
        )
        _run(["ip", "netns", "exec", self.hosts[host].namespace, "nft", "-f", "-"], stdin=rules)
