"""Hostile networks for interop tests: two private network namespaces joined
by a veth pair, with partitions, rate limits and loss.

Role: `link()` makes a *server* namespace (10.77.0.1 on its veth ``vs``) and
a *client* namespace (10.77.0.2 on ``vc``), each with its own loopback up;
`Link.run` / `Link.popen` start programs inside one of them (``ip netns exec``).
A partition (`Link.partition`) drops every packet on the client's veth in
both directions with iptables inside the client namespace: no FIN, no RST,
as when the client's host dies or its cable is pulled.  `Link.shape` puts a
qdisc on one or both veth ends (tbf for a rate; netem where the kernel has
it -- the test machine's kernel has no sch_netem), `Link.lose` random loss
with iptables' statistic match.

Invariants: nothing here touches the host's own namespace, iptables, qdiscs
or routes (the veth pair is created directly inside the two namespaces).
Cleanup is guaranteed by the context manager, also when the test fails:
every process still inside either namespace (only processes the test
started can be there) is killed by PID, then both namespaces are deleted,
which removes the veth pair, the rules and the qdiscs with them.

Tests skip (with the reason) only where namespaces cannot be made at all
(not root, no CAP_NET_ADMIN, no ``ip``): `skip_reason`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Iterator, Sequence

SERVER_ADDR = "10.77.0.1"
CLIENT_ADDR = "10.77.0.2"
_counter = itertools.count()
_probed: str | None | bool = False


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can).  Probed once."""
    global _probed
    if _probed is not False:
        return _probed  # type: ignore[return-value]
    reason = None
    if shutil.which("ip") is None:
        reason = "no ip(8) (iproute2)"
    elif os.geteuid() != 0:
        reason = "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    else:
        name = f"nbdbprobe{os.getpid()}"
        r = _ip("netns", "add", name, check=False)
        if r.returncode != 0:
            reason = f"cannot create a network namespace: {r.stderr.strip()}"
        else:
            _ip("netns", "delete", name, check=False)
            if shutil.which("iptables") is None or shutil.which("tc") is None:
                reason = "no iptables or tc"
    _probed = reason
    return reason


class Link:
    """Two namespaces and the veth pair between them (see the module doc).

    Fields: ``server_ns``, ``client_ns`` (namespace names, unique per
    process and link); ``server_addr``, ``client_addr`` (IPv4 addresses
    on the veth ends ``vs`` and ``vc``); ``procs`` (Popen objects started
    through `popen`, killed at cleanup)."""

    def __init__(self, tag: str) -> None:
        self.server_ns = f"{tag}s"
        self.client_ns = f"{tag}c"
        self.server_addr = SERVER_ADDR
        self.client_addr = CLIENT_ADDR
        self.procs: list[subprocess.Popen] = []

    def argv(self, side: str, argv: Sequence[str]) -> list[str]:
        ns = self.server_ns if side == "server" else self.client_ns
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, side: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(side, argv), check=check, timeout=timeout, **kw)

    def popen(self, side: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(side, argv), **kw)
        self.procs.append(p)
        return p

    def partition(self) -> None:
        """Drop every packet to and from the client's veth, both ways, silently."""
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.run("client", ["iptables", "-w", "-A", chain, flag, "vc", "-j", "DROP"])

    def heal(self) -> None:
        self.run("client", ["iptables", "-w", "-F"])

    def shape(self, spec: Sequence[str], sides: Sequence[str] = ("server", "client")) -> None:
        """``tc qdisc replace dev vs|vc root SPEC...`` on each side (egress), e.g.
        ``["tbf", "rate", "40mbit", ...]``; netem where the kernel has it."""
        for side in sides:
            dev = "vs" if side == "server" else "vc"
            self.run(side, ["tc", "qdisc", "replace", "dev", dev, "root", *spec])

    def lose(self, probability: float) -> None:
        """Drop each packet the client's veth receives or sends with this
        probability (iptables statistic: random loss without netem)."""
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.run("client", ["iptables", "-w", "-A", chain, flag, "vc", "-m", "statistic", "--mode", "random",
                                "--probability", str(probability), "-j", "DROP"])

    def established(self, side: str, port: int) -> int:
        """TCP connections of ``side`` in ESTABLISHED state with local port ``port``."""
        out = self.run(side, ["ss", "-Htn", "state", "established", f"( sport = :{port} )"]).stdout
        return sum(1 for line in out.splitlines() if line.strip())

    def last_ack(self, side: str, port: int) -> float:
        """Seconds since the one ESTABLISHED connection of ``side`` on local port
        ``port`` last received an ACK (``ss -i`` lastack; 0 if not shown yet)."""
        out = self.run(side, ["ss", "-Htni", "state", "established", f"( sport = :{port} )"]).stdout
        m = re.search(r"lastack:(\d+)", out)
        return int(m.group(1)) / 1000 if m else 0.0

    def wait_established(self, side: str, port: int, want, timeout: float) -> float:
        """Poll until ``want(established(side, port))``; return the seconds it took
        (AssertionError after ``timeout``)."""
        t0 = time.monotonic()
        while True:
            n = self.established(side, port)
            if want(n):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{n} connections established on {side} port {port} after {timeout} s")
            time.sleep(0.1)

    def _pids(self, ns: str) -> list[int]:
        r = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            with contextlib.suppress(Exception):
                p.wait(10)
        for ns in (self.server_ns, self.client_ns):
            # Only what this test started can run in its namespaces.
            for pid in self._pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(self._pids(ns) for ns in (self.server_ns, self.client_ns)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for ns in (self.server_ns, self.client_ns):
            _ip("netns", "delete", ns, check=False)


@contextlib.contextmanager
def link() -> Iterator[Link]:
    """A fresh `Link`; deleted (processes killed, namespaces gone) on exit."""
    lk = Link(f"nbdb{os.getpid()}x{next(_counter)}")
    try:
        _ip("netns", "add", lk.server_ns)
        _ip("netns", "add", lk.client_ns)
        _ip("link", "add", "vs", "netns", lk.server_ns, "type", "veth", "peer", "name", "vc",
            "netns", lk.client_ns)
        for side, dev, addr in (("server", "vs", lk.server_addr), ("client", "vc", lk.client_addr)):
            lk.run(side, ["ip", "link", "set", "lo", "up"])
            lk.run(side, ["ip", "addr", "add", f"{addr}/24", "dev", dev])
            lk.run(side, ["ip", "link", "set", dev, "up"])
        yield lk
    finally:
        lk.cleanup()
