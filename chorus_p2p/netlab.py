"""A virtual LAN on one machine (used by the P2P tests and benchmarks): one network namespace per node, joined by veth pairs to a bridge
that lives in a namespace of its own. Nothing touches the host's real interfaces:

- LAN: node ``i`` has ``lan0`` = 10.X.0.(10+i)/24 on the bridge; mDNS runs only there.
- Control: each node also has a veth to the host namespace, created by the test, so the test
  process can call the node's API while its LAN link is down. The node's end is unnumbered: its
  control address 10.X.(100+i).2 sits on the namespace's ``lo`` with a host route over the veth.
  So even a node run the default way (mDNS on all interfaces, no ``--interface``) multicasts only
  on the LAN and on its own namespace's loopback, never toward the host namespace.
- The LAN is the namespace's default route, as on a lab machine (and the bridge namespace has no
  uplink, so nothing leaves the lab).

Everything is torn down on exit, including when a test fails.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

NODE_PORT = 8470


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (for static-peer federations on loopback)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=20)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make namespaces, or None if it can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"chp{random.randrange(16**6):06x}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class NodeProc:
    """``chorus-node up --headless`` inside a namespace; stdout JSON lines collected in a thread."""

    def __init__(self, lab: "NetLab", index: int, data_dir: Path, model: Path,
                 extra: list[str], env: dict[str, str] | None = None, bind_lan: bool = True):
        """``bind_lan=False`` runs ``up`` as README tells a lab to: no ``--interface``, so
        zeroconf binds every interface of the namespace."""
        self.lab, self.index, self.data_dir = lab, index, data_dir
        self.lan_ip = lab.lan_ip(index)
        self.url = f"http://{lab.ctl_ip(index)}:{NODE_PORT}"
        interface = ["--interface", self.lan_ip] if bind_lan else []
        cmd = ["ip", "netns", "exec", lab.ns(index), sys.executable, "-m", "chorus_p2p.cli.main",
               "up", "--headless", "--host", "0.0.0.0", "--port", str(NODE_PORT), *interface,
               "--data-dir", str(data_dir), "--model", str(model), *extra]
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"raw": line.rstrip()})

    def describe(self, lines: int = 6) -> str:
        """Exit status and last output lines: what a timed-out wait needs to be diagnosed."""
        code = self.proc.poll()
        state = "running" if code is None else f"exited {code}"
        tail = [json.dumps(e)[:240] for e in list(self.events)[-lines:]]
        return f"node {self.index} ({state}):\n    " + "\n    ".join(tail or ["(no output)"])

    def saw(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()


class NetLab:
    def __init__(self, size: int):
        self.tag = f"{random.randrange(16**4):04x}"
        self.net = random.randrange(100, 250)
        self.size = size
        self.bridge_ns = f"chb{self.tag}"
        self.procs: list[NodeProc] = []
        self._made: list[str] = []
        self._blocked: set[tuple[int, int]] = set()

    def ns(self, i: int) -> str:
        return f"chn{self.tag}{i}"

    def lan_ip(self, i: int) -> str:
        return f"10.{self.net}.0.{10 + i}"

    def ctl_ip(self, i: int) -> str:
        return f"10.{self.net}.{100 + i}.2"

    def __enter__(self) -> "NetLab":
        try:
            _ip("netns", "add", self.bridge_ns)
            self._made.append(self.bridge_ns)
            _ip("link", "add", "br0", "type", "bridge", netns=self.bridge_ns)
            _ip("link", "set", "br0", "up", netns=self.bridge_ns)
            for i in range(self.size):
                self.add_host(i)
        except BaseException:
            self.close()
            raise
        return self

    def add_host(self, i: int) -> None:
        self.size = max(self.size, i + 1)
        ns = self.ns(i)
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("link", "set", "lo", "up", netns=ns)
        # LAN: lan0 in the node, p<i> on the bridge.
        _ip("link", "add", "lan0", "netns", ns, "type", "veth", "peer", "name", f"p{i}",
            "netns", self.bridge_ns)
        _ip("addr", "add", f"{self.lan_ip(i)}/24", "dev", "lan0", netns=ns)
        _ip("link", "set", "lan0", "up", netns=ns)
        _ip("link", "set", f"p{i}", "master", "br0", netns=self.bridge_ns)
        _ip("link", "set", f"p{i}", "up", netns=self.bridge_ns)
        _ip("route", "add", "default", "dev", "lan0", netns=ns)
        # Control: ctl0 in the node, c<tag><i> in the host namespace (made by us, unicast only).
        # ctl0 has no address (see the module docstring): zeroconf, which lists interface
        # addresses, cannot choose it.
        host_if = f"c{self.tag}{i}"
        host_ip = f"10.{self.net}.{100 + i}.1"
        _ip("link", "add", "ctl0", "netns", ns, "type", "veth", "peer", "name", host_if)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("addr", "add", f"{self.ctl_ip(i)}/32", "dev", "lo", netns=ns)
        _ip("link", "set", "ctl0", "up", netns=ns)
        _ip("route", "add", f"{host_ip}/32", "dev", "ctl0", "src", self.ctl_ip(i), netns=ns)
        # Multicast leaves only through the LAN, never the control link.
        _ip("route", "add", "224.0.0.0/4", "dev", "lan0", netns=ns)

    def link(self, i: int, up: bool) -> None:
        """Cut or restore node i's LAN link (its control link stays up)."""
        _ip("link", "set", f"p{i}", "up" if up else "down", netns=self.bridge_ns)

    def block(self, i: int, j: int) -> None:
        """Stop unicast between nodes i and j (both ways) while both keep their LAN: what a
        partition that is not a clean cut looks like (a bridge: A-B and B-C up, A-C down).
        Multicast still passes, as it often does when a switch or firewall rule misbehaves."""
        for a, b in ((i, j), (j, i)):
            _ip("route", "replace", "blackhole", f"{self.lan_ip(b)}/32", netns=self.ns(a))
        self._blocked.add((min(i, j), max(i, j)))

    def unblock(self, i: int, j: int) -> None:
        for a, b in ((i, j), (j, i)):
            _ip("route", "del", "blackhole", f"{self.lan_ip(b)}/32", netns=self.ns(a),
                check=False)
        self._blocked.discard((min(i, j), max(i, j)))

    def partition(self, *groups: set[int]) -> None:
        """Only nodes in the same group reach each other (unicast)."""
        where = {n: k for k, group in enumerate(groups) for n in group}
        for i in where:
            for j in where:
                if i < j and where[i] != where[j]:
                    self.block(i, j)

    def heal(self) -> None:
        """Every block and every cut link undone."""
        for i, j in list(self._blocked):
            self.unblock(i, j)
        for i in range(self.size):
            self.link(i, True)

    def shape(self, i: int, rate_mbit: float, delay_ms: float = 0.0, mtu: int | None = None,
              loss_pct: float = 0.0) -> str:
        """Shape node i's LAN link both ways, as Wi-Fi or a busy switch would. netem gives rate,
        delay and loss; a kernel without sch_netem gets htb's rate alone. ``mtu`` splits every
        body into more TCP segments. Returns what was applied, for the test's report."""
        if mtu is not None:
            _ip("link", "set", "lan0", "mtu", str(mtu), netns=self.ns(i))
            _ip("link", "set", f"p{i}", "mtu", str(mtu), netns=self.bridge_ns)
        applied = []
        for ns, dev in ((self.ns(i), "lan0"), (self.bridge_ns, f"p{i}")):
            netem = subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
                 "delay", f"{delay_ms}ms", "rate", f"{rate_mbit}mbit",
                 *(["loss", f"{loss_pct}%"] if loss_pct else [])],
                capture_output=True, text=True, timeout=20)
            if netem.returncode == 0:
                applied.append(f"netem {delay_ms}ms {rate_mbit}mbit loss {loss_pct}%")
                continue
            for cmd in (["qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
                         "default", "1"],
                        ["class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                         "rate", f"{rate_mbit}mbit"]):
                subprocess.run(["ip", "netns", "exec", ns, "tc", *cmd], check=True,
                               capture_output=True, text=True, timeout=20)
            applied.append(f"htb {rate_mbit}mbit (no netem in this kernel: no delay, no loss)")
        return "; ".join(sorted(set(applied))) + (f"; mtu {mtu}" if mtu else "")

    def start(self, i: int, data_dir: Path, model: Path, extra: list[str] | None = None,
              env: dict[str, str] | None = None, bind_lan: bool = True) -> NodeProc:
        proc = NodeProc(self, i, data_dir, model, extra or [], env, bind_lan)
        self.procs.append(proc)
        return proc

    def describe(self) -> str:
        return "\n".join(proc.describe() for proc in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.kill9()
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for i in range(self.size):  # host ends vanish with their namespace; be sure
            subprocess.run(["ip", "link", "del", f"c{self.tag}{i}"], capture_output=True)
        self._made.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1,
               lab: "NetLab | None" = None):
    """Poll until ``predicate`` is truthy; on timeout, say what the lab's nodes last printed."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # a node still starting
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    detail = f"\n{lab.describe()}" if lab is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}){detail}")
