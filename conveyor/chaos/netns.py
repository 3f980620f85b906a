"""A simulated second host: a network namespace joined to this one by a veth pair, and a link to cut.

A worker started inside the namespace reaches the broker only through the veth pair, at the host
end's address; `cut()` sets the host end down, which silences the link in both directions without
closing any socket, as a failed switch or a partitioned network would. Nothing is routed beyond the
pair: the /30 has two addresses, one per end, and no gateway.

Needs root (CAP_NET_ADMIN) and iproute2. The namespace and the pair are named after this process, so
that concurrent runs never collide and `remove()` deletes exactly what `set_up()` made.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess

from conveyor.errors import StackError, UsageError
from conveyor.stack.local import alive
from conveyor.chaos.node import Owned

log = logging.getLogger(__name__)

POOL = ipaddress.ip_network("10.251.0.0/16")  # where a /30 is picked when none is given
PREFIX = "conveyor-chaos-"  # then the pid of the process that made it


class Namespace(Owned):
    def __init__(self, subnet: str | None = None) -> None:
        """`subnet`: the /30 for the pair; by default a free one in 10.251.0.0/16, chosen at set_up()."""
        if subnet is not None:
            try:
                net = ipaddress.ip_network(subnet)
            except ValueError as exc:
                raise UsageError(f"the partition subnet must be an IPv4 /30: {exc}") from None
            if net.prefixlen != 30 or net.version != 4:
                raise UsageError(f"the partition subnet must be an IPv4 /30, got {subnet}")
        self.subnet = subnet
        self.host_ip = self.ns_ip = ""
        self.name, self.host_end, self.ns_end = _names(os.getpid())
        self.created = False

    @staticmethod
    def check_possible() -> None:
        if os.geteuid() != 0:
            raise UsageError("--partition creates a network namespace and a veth pair, which needs root")
        if not shutil.which("ip"):
            raise UsageError("--partition needs the `ip` command (iproute2)")

    def set_up(self) -> None:
        self.check_possible()
        net = self._free_subnet()
        self.subnet = str(net)
        self.host_ip, self.ns_ip = (str(a) for a in net.hosts())
        self.created = True  # from here on, remove() cleans up whatever part was made
        for cmd in (
            ["netns", "add", self.name],
            ["link", "add", self.host_end, "type", "veth", "peer", "name", self.ns_end],
            ["link", "set", self.ns_end, "netns", self.name],
            ["addr", "add", f"{self.host_ip}/30", "dev", self.host_end],
            ["link", "set", self.host_end, "up"],
            ["-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_end],
            ["-n", self.name, "link", "set", self.ns_end, "up"],
            ["-n", self.name, "link", "set", "lo", "up"],
        ):
            _ip(*cmd)
        log.info("Created network namespace %s (%s) joined by %s (%s).", self.name, self.ns_ip, self.host_end, self.host_ip)

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """The given /30 if no route of this machine overlaps it, else refuse; without one, the first
        free /30 of the pool, scanning from a point set by the pid so that concurrent runs differ."""
        routes = []
        for line in _ip("-4", "route", "show", "table", "all").splitlines():
            try:
                route = ipaddress.ip_network(line.split()[0], strict=False)
            except (ValueError, IndexError):  # default, broadcast, local ... entries
                continue
            if route.prefixlen:
                routes.append((route, line.strip()))
        if self.subnet is not None:
            net = ipaddress.ip_network(self.subnet)
            for route, line in routes:
                if route.overlaps(net):
                    raise UsageError(f"the partition subnet {net} overlaps a route of this machine ({line}); "
                                     "pick a free one with --partition-subnet")
            return net
        candidates = list(POOL.subnets(new_prefix=30))
        start = os.getpid() % len(candidates)
        for net in candidates[start:] + candidates[:start]:
            if not any(route.overlaps(net) for route, _ in routes):
                return net
        raise StackError(f"no /30 in {POOL} is free of this machine's routes; pass --partition-subnet")

    def command(self, argv: list[str]) -> list[str]:
        """`argv`, run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.host_end, "down")
        log.info("Cut the link to namespace %s.", self.name)

    def heal(self) -> None:
        _ip("link", "set", self.host_end, "up")
        log.info("Restored the link to namespace %s.", self.name)

    def remove(self) -> None:
        """Delete the pair and the namespace."""
        if not self.created:
            return
        _delete(self.name, self.host_end)
        self.created = False
        log.info("Removed network namespace %s.", self.name)


def leftovers() -> list[str]:
    """Namespaces of runs that died without removing them (their process is gone)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return []
    found = []
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        pid = name.removeprefix(PREFIX)
        if name.startswith(PREFIX) and pid.isdigit() and not alive(pid):
            found.append(name)
    return found


def remove_leftover(name: str) -> None:
    _, host_end, _ = _names(name.removeprefix(PREFIX))
    _delete(name, host_end)


def _names(pid: int | str) -> tuple[str, str, str]:
    """The namespace and its two veth ends, named after the run's process (interfaces: 15 characters at most)."""
    return f"{PREFIX}{pid}", f"cvc{pid}h", f"cvc{pid}n"


def _delete(name: str, host_end: str) -> None:
    """Delete the veth pair (deleting either end deletes both) and the namespace."""
    subprocess.run(["ip", "link", "del", host_end], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout
