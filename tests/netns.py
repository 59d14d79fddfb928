"""Network namespaces joined by veth pairs, with faults on chosen links: the chaos-test network of one machine.

Each node (prefill, decode, gateway) gets its own namespace with a service address on its loopback; every pair of
nodes is joined by its own veth pair with /32 routes, so a fault on the prefill-decode link touches only traffic
between those two. The test process (in the root namespace) reaches each node over one more veth pair from an
address of the same private subnet, a management path the faults never touch. Addresses exist only on these
interfaces; the subnet is picked per run from 10.213.0.0/16 so parallel runs do not collide.

Faults, applied to both directions of a link (on each end's egress):
- delay and jitter: `tc netem` (needs the sch_netem kernel module);
- rate limit: `tc netem rate` where netem exists, else `tc tbf` (used to stretch a handoff over seconds);
- loss and partition: nftables `numgen random` / unconditional drop on the link's interface. Dropping a packet is
  what netem's `loss` does too; nftables also works where sch_netem is missing.
GSO is off on the veths (gso_max_segs 1), so one dropped packet is one MTU-sized segment, as on a real wire.

Everything is torn down by `Topology.close()` (namespaces, and with them every veth), also after failures;
namespaces left by a run that was SIGKILLed are removed by the next one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "disagg-t"  # namespace names: disagg-t<creator pid>-<node>
ROOT = "root"


class Unsupported(Exception):
    """The machine cannot build this network (not root, a tool or kernel module missing): the reason."""


def _run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, input=stdin)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def _in(ns: str, *argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    prefix = () if ns == ROOT else ("ip", "netns", "exec", ns)
    return _run(*prefix, *argv, check=check, stdin=stdin)


def support() -> str | None:
    """Why namespaces, veth pairs and nftables drops cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (Debian package {package})"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _in(probe, "ip", "link", "set", "lo", "up")
        _in(probe, "nft", "add", "table", "inet", "probe")
    except RuntimeError as error:
        return f"cannot create a network namespace with an nftables table: {error}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def qdisc_available(kind: str) -> bool:
    """Whether the kernel has this queueing discipline (netem, tbf: kernel modules that may be missing)."""
    probe = f"{PREFIX}probe{os.getpid()}"
    args = {"netem": ["delay", "1ms"], "tbf": ["rate", "1mbit", "burst", "32kb", "latency", "50ms"]}[kind]
    try:
        _run("ip", "netns", "add", probe)
        _in(probe, "ip", "link", "set", "lo", "up")
        return _in(probe, "tc", "qdisc", "add", "dev", "lo", "root", kind, *args, check=False).returncode == 0
    finally:
        _run("ip", "netns", "del", probe, check=False)


def remove_stale() -> None:
    """Namespaces of earlier runs whose process is gone (a SIGKILLed test cannot clean up after itself)."""
    for line in _run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name[len(PREFIX) :].split("-")[0]
        if name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _kill_processes(name)
            _run("ip", "netns", "del", name, check=False)


def _kill_processes(ns: str) -> None:
    for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


@dataclass
class Faults:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float = 0.0
    partition: bool = False


@dataclass
class End:
    ns: str
    dev: str


class Topology:
    """Namespaces for `nodes`, a veth pair between every two of them and one from the root namespace to each."""

    def __init__(self, nodes: tuple[str, ...] = ("prefill", "decode", "gateway")):
        self.nodes = nodes
        self.ns = {node: f"{PREFIX}{os.getpid()}-{node}" for node in nodes}
        self.ns[ROOT] = ROOT
        self.links: dict[frozenset[str], tuple[End, End]] = {}
        self.faults: dict[frozenset[str], Faults] = {}
        self.netem = qdisc_available("netem")
        self.tbf = qdisc_available("tbf")
        self._created: list[str] = []
        self.subnet = self._free_subnet()
        self.address = {node: f"{self.subnet}.{i + 1}" for i, node in enumerate(nodes)}
        self.address[ROOT] = f"{self.subnet}.254"

    @staticmethod
    def _free_subnet() -> str:
        """A /24 of 10.213.0.0/16 that no interface or route here uses."""
        used = _run("ip", "-o", "addr").stdout + _run("ip", "route").stdout
        for third in random.sample(range(256), 256):
            subnet = f"10.213.{third}"
            if f"{subnet}." not in used:
                return subnet
        raise Unsupported("no free /24 in 10.213.0.0/16")

    def build(self) -> None:
        remove_stale()
        for node in self.nodes:
            ns = self.ns[node]
            _run("ip", "netns", "add", ns)
            self._created.append(ns)
            _in(ns, "ip", "link", "set", "lo", "up")
            _in(ns, "ip", "addr", "add", f"{self.address[node]}/32", "dev", "lo")
            _in(ns, "nft", "add", "table", "inet", "faults")
            _in(
                ns,
                "nft",
                "add",
                "chain",
                "inet",
                "faults",
                "out",
                "{ type filter hook output priority 0 ; policy accept ; }",
            )
        tag = self.subnet.rsplit(".", 1)[1]  # interface names: unique per run, at most 15 characters
        short = {node: node[0] for node in self.nodes} | {ROOT: "r"}
        for a, b in itertools.chain(itertools.combinations(self.nodes, 2), ((ROOT, n) for n in self.nodes)):
            ends = (End(self.ns[a], f"dt{tag}{short[a]}{short[b]}"), End(self.ns[b], f"dt{tag}{short[b]}{short[a]}"))
            self._veth(*ends)
            self.links[frozenset((a, b))] = ends
            self.faults[frozenset((a, b))] = Faults()
            if a == ROOT and b == self.nodes[0]:  # the test's own address, on its first veth
                _run("ip", "addr", "add", f"{self.address[ROOT]}/32", "dev", ends[0].dev)
            for (node, end), peer in (((a, ends[0]), b), ((b, ends[1]), a)):  # each end: a route to the other
                _in(end.ns, "ip", "route", "add", f"{self.address[peer]}/32", "dev", end.dev, "src", self.address[node])

    def _veth(self, a: End, b: End) -> None:
        where = [(a, ["netns", a.ns] if a.ns != ROOT else []), (b, ["netns", b.ns] if b.ns != ROOT else [])]
        gso = ["gso_max_segs", "1"]
        _run("ip", "link", "add", a.dev, *where[0][1], *gso, "type", "veth", "peer", "name", b.dev, *where[1][1], *gso)
        if a.ns == ROOT:
            self._created.append(a.dev)
        for end in (a, b):
            _in(end.ns, "ip", "link", "set", end.dev, "up")

    def exec_argv(self, node: str, argv: list[str]) -> list[str]:
        """`argv` run inside the node's namespace."""
        return ["ip", "netns", "exec", self.ns[node], *argv]

    def set_faults(self, a: str, b: str, faults: Faults) -> None:
        """Replace the faults of the a-b link (both directions)."""
        if (faults.delay_ms or faults.jitter_ms) and not self.netem:
            raise Unsupported("delay needs tc netem (kernel module sch_netem), which this kernel lacks")
        if faults.rate_mbit and not (self.netem or self.tbf):
            raise Unsupported("a rate limit needs tc netem or tbf, which this kernel lacks")
        key = frozenset((a, b))
        self.faults[key] = faults
        for end in self.links[key]:
            _in(end.ns, "tc", "qdisc", "del", "dev", end.dev, "root", check=False)
            if self.netem and (faults.delay_ms or faults.jitter_ms or faults.rate_mbit):
                args = (
                    ["delay", f"{faults.delay_ms}ms", f"{faults.jitter_ms}ms"]
                    if faults.delay_ms or faults.jitter_ms
                    else []
                )
                args += ["rate", f"{faults.rate_mbit}mbit"] if faults.rate_mbit else []
                _in(end.ns, "tc", "qdisc", "add", "dev", end.dev, "root", "netem", *args, "limit", "100000")
            elif faults.rate_mbit:
                _in(
                    end.ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    end.dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{faults.rate_mbit}mbit",
                    "burst",
                    "64kb",
                    "latency",
                    "2s",
                )
        for ns in {end.ns for end in self.links[key]}:
            self._apply_drops(ns)

    def clear_faults(self) -> None:
        for key in list(self.faults):
            if self.faults[key] != Faults():
                a, b = tuple(key)
                self.set_faults(a, b, Faults())

    def _apply_drops(self, ns: str) -> None:
        """This namespace's nftables drop rules, rebuilt from the faults of its links."""
        if ns == ROOT:
            return  # management links carry no loss or partition (and the root namespace's rules stay untouched)
        rules = ["flush chain inet faults out\n"]
        for key, (x, y) in self.links.items():
            end = x if x.ns == ns else y if y.ns == ns else None
            faults = self.faults[key]
            if end is None:
                continue
            if faults.partition:
                rules.append(f'add rule inet faults out oifname "{end.dev}" drop\n')
            elif faults.loss_pct:
                rules.append(
                    f'add rule inet faults out oifname "{end.dev}" '
                    f"numgen random mod 10000 < {round(faults.loss_pct * 100)} drop\n"
                )
        _in(ns, "nft", "-f", "-", stdin="".join(rules))  # one transaction: the rules change at once

    def tx_bytes(self, a: str, b: str) -> int:
        """Bytes a's end of the a-b link has sent (to tell whether a fault struck during a transfer)."""
        end = next(e for e in self.links[frozenset((a, b))] if e.ns == self.ns[a])
        return int(_in(end.ns, "cat", f"/sys/class/net/{end.dev}/statistics/tx_bytes").stdout)

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them (their veths go with them) and the root-side veths."""
        for name in reversed(self._created):
            if name.startswith(PREFIX):
                _kill_processes(name)
                _run("ip", "netns", "del", name, check=False)
            else:
                _run("ip", "link", "del", name, check=False)
        self._created.clear()


@contextlib.contextmanager
def topology(nodes: tuple[str, ...] = ("prefill", "decode", "gateway")) -> Iterator[Topology]:
    """A built Topology, always torn down when the block ends."""
    reason = support()
    if reason:
        raise Unsupported(reason)
    topo = Topology(nodes)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()
