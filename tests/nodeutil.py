"""Helpers for node tests: in-process nodes on loopback, node subprocesses, quick adapters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from chorus_p2p.client import (AsyncNodeClient, ConflictError, NodeClient, NodeError,
                               NodeUnreachable, ServerError)
from chorus_p2p.netlab import free_loopback_ports
from chorus_p2p.trust.identity import copy_admin_key, init_data_dir
from chorus_p2p.node.service import Node
from chorus_p2p.node.settings import NodeSettings
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.tiny import write_random_update

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")


def node_settings(data_dir: Path, model: Path, **overrides: Any) -> NodeSettings:
    settings = NodeSettings(model=str(model), data_dir=str(data_dir), host="127.0.0.1", port=0,
                            rank=RANK, alpha=ALPHA, target_modules=TARGETS, min_updates=2,
                            round_deadline=600.0, mdns=False)
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


async def start_node(data_dir: Path, model: Path, **overrides: Any) -> Node:
    if not (data_dir / "identity.key").exists():
        init_data_dir(data_dir, "testlab")
    node = Node(node_settings(data_dir, model, **overrides))
    await node.start()
    return node


@contextmanager
def node_in_thread(data_dir: Path, model: Path, **overrides: Any) -> Iterator[Node]:
    """A node on its own event loop in a thread, for synchronous tests (CLI, urllib, hypothesis)."""
    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(start_node(data_dir, model, **overrides))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def node_client(node: Node, client_id: str = "alice", *, admin: bool = False,
                **kwargs: Any) -> AsyncNodeClient:
    """A client of an in-process node, signed with its federation secret; ``admin`` adds the
    node's admin token (what ``NodeClient.from_data_dir`` gives a local operator)."""
    if admin:
        kwargs.setdefault("admin_token", node.identity.admin_token)
    return AsyncNodeClient(node.url, secret=node.identity.secret, client_id=client_id, **kwargs)


def dir_client(url: str, data_dir: Path, client_id: str, *, admin: bool = False
               ) -> AsyncNodeClient:
    """A client of a node process, with the credentials in its data dir."""
    from chorus_p2p.trust.identity import load_identity

    identity = load_identity(data_dir)
    return AsyncNodeClient(url, secret=identity.secret, client_id=client_id,
                           admin_token=identity.admin_token if admin else None)


def run_cli(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """``chorus-node ARGS`` as a user runs it: a new process, offline, output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "chorus_p2p.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


class EventTap:
    """A node's event stream as a dashboard receives it (``bus.subscribe``), drained on
    demand: tests assert on what the WebSocket carries, not on private state."""

    def __init__(self, node: Node):
        self._queue = node.bus.subscribe()
        self.events: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        while not self._queue.empty():
            event = self._queue.get_nowait()
            if event is not None:
                self.events.append(event)
        return self.events

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.drain()]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.drain() if e["kind"] == kind]


def write_update(path: Path, spec: FederationSpec, seed: int, *, scale: float = 0.05) -> Path:
    return write_random_update(path, spec, seed, scale)


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def blob_files(data_dir: Path) -> set[str]:
    root = data_dir / "blobs"
    return {p.name for p in root.glob("??/*")}


class NodeProcess:
    """``chorus-node up --headless`` as a real subprocess, for kill -9 tests."""

    def __init__(self, data_dir: Path, model: Path, env: dict[str, str] | None = None,
                 extra: list[str] | None = None, port: int = 0):
        self.data_dir, self.model = data_dir, model
        self.env = {**os.environ, **(env or {})}
        self.extra = extra or []
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.lines: list[dict] = []

    def events(self, kind: str) -> list[dict]:
        return [r for r in list(self.lines) if r.get("event") == kind]

    def _drain(self) -> None:
        """Keep reading the node's log: a full pipe would stall the node on its next line."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"raw": line.rstrip()})

    def start(self, timeout: float = 60.0) -> str:
        cmd = [sys.executable, "-m", "chorus_p2p.cli.main", "up", "--headless",
               "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--model", str(self.model), "--rank", str(RANK),
               "--alpha", str(ALPHA), "--target-modules", ",".join(TARGETS), "--no-mdns",
               *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"node exited early: {self.proc.stderr.read()}")
            record = json.loads(line)
            self.lines.append(record)
            if record.get("event") == "listening":
                self.url = record["data"]["url"]
                threading.Thread(target=self._drain, daemon=True).start()
                return self.url
        raise AssertionError("node did not start listening in time")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# The nodes of a loopback federation share this test's event loop: at 0.4 s a loaded machine
# (two busy loops beside the suite) delayed heartbeats past CheckQuorum and the coordinator
# stepped down mid-round. 1 s is a lab's default; waits are on events, not on this number.
LOOPBACK_ELECTION_S = 1.0


class Federation:
    """In-process nodes on loopback with static peers (no multicast)."""

    def __init__(self, tmp_path, tiny_base, n: int, **overrides):
        self.tmp_path, self.tiny_base = tmp_path, tiny_base
        self.ports = free_loopback_ports(n)
        first = init_data_dir(tmp_path / "n0", "looplab")
        self.token = first.join_token()
        for i in range(1, n):
            init_data_dir(tmp_path / f"n{i}", join_token=self.token)
        self.overrides = overrides
        self.nodes: dict[int, Node] = {}

    def grant_admin(self, *indexes: int) -> None:
        """Copy the founder's federation admin key into these nodes' data dirs (default: all),
        as a founder does for the people it trusts; call before starting them."""
        from chorus_p2p.trust.identity import copy_admin_key

        for i in indexes or range(1, len(self.ports)):
            copy_admin_key(self.tmp_path / "n0", self.tmp_path / f"n{i}")

    def settings(self, i: int):
        peers = tuple(f"127.0.0.1:{p}" for j, p in enumerate(self.ports) if j != i)
        return node_settings(self.tmp_path / f"n{i}", self.tiny_base, port=self.ports[i],
                             peers=peers, **{"election_timeout": LOOPBACK_ELECTION_S,
                                             **self.overrides})

    async def start(self, i: int, *, wire_version: int | None = None) -> Node:
        node = Node(self.settings(i))
        if wire_version is not None:  # a node of another release (test_wire_format.py)
            node.wire_version = node.cluster.client.wire_version = wire_version
        await node.start()
        self.nodes[i] = node
        return node

    async def start_all(self) -> Node:
        """Start every node; return the one coordinator they all follow."""
        for i in range(len(self.ports)):
            await self.start(i)
        return await self.one_coordinator()

    async def stop(self, i: int) -> None:
        await self.nodes.pop(i).stop()

    async def vanish(self, i: int) -> None:
        """The node stops answering and says nothing (a partition, a laptop lid closed): every
        task and socket dropped without a goodbye. Not a crash: nothing of what a kill -9
        loses is lost here, so claims about kill -9 use ``Processes``."""
        node = self.nodes.pop(i)
        node.cluster._stopping = True
        for task in list(node.cluster._tasks) + list(node.rounds._tasks):
            task.cancel()
        if node.state._task is not None:
            node.state._task.cancel()
        await node._runner.cleanup()
        await node.cluster.client.close()
        node.ledger.close()
        node.lock.release()  # the kernel drops a dead process's flock

    def coordinators(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.cluster.role == "coordinator"]

    async def one_coordinator(self, timeout=15.0) -> Node:
        def check():
            leaders = self.coordinators()
            if len(leaders) != 1:
                return None
            leader = leaders[0]
            followers_agree = all(n.cluster.coordinator == leader.node_id
                                  for n in self.nodes.values())
            return leader if followers_agree else None
        return await wait_for(check, timeout=timeout)

    def client(self, node: Node, cid: str) -> AsyncNodeClient:
        return node_client(node, cid)

    async def close(self):
        for i in list(self.nodes):
            await self.stop(i)


async def chances_to_lead(*nodes: Node, n: int = 3, timeout: float = 30.0) -> None:
    """Wait until each node's election timer fired ``n`` more times: before asserting that
    nobody took the lead, wait for chances to take it, not for seconds (under load a fixed
    sleep can pass with no chance at all)."""
    start = {id(node): node.cluster.election_timeouts for node in nodes}
    await wait_for(lambda: all(node.cluster.election_timeouts >= start[id(node)] + n
                               for node in nodes), timeout=timeout)


async def heartbeats(node: Node, n: int = 3, timeout: float = 30.0) -> None:
    """Wait until a coordinator sent ``n`` more heartbeat rounds (its periodic work ran)."""
    start = node.cluster.heartbeats_sent
    await wait_for(lambda: node.cluster.heartbeats_sent >= start + n, timeout=timeout)


async def periodic_work(node: Node, n: int = 3, timeout: float = 30.0) -> None:
    """Wait until a node alone (coordinator of itself, or waiting for its federation) ran its
    timers ``n`` more times: heartbeats as coordinator, election timers otherwise. Before
    asserting that something did not happen, wait for chances for it to happen."""
    def work() -> int:
        return node.cluster.heartbeats_sent + node.cluster.election_timeouts
    start = work()
    await wait_for(lambda: work() >= start + n, timeout=timeout)


def history(node: Node):
    return [(r["round"], r["state"], r["adapter_sha"], r["log_hash"])
            for r in node.ledger.list_rounds(limit=1000) if r["state"] == "committed"]


def same_state_bytes(a: Node, b: Node) -> bool:
    return (a.state_store.working.read_bytes() == b.state_store.working.read_bytes()
            and a.state_store.round == b.state_store.round)


RESEND_CODES = ("not_durable", "not_coordinator", "no_quorum")


async def run_round(fed: Federation, leader: Node, number: int, clients=("a", "b"),
                    seed: int = 0):
    """Each client submits once, as the SDK's users do: an update the coordinator could not
    yet acknowledge (``not_durable``, or the coordinator stepped down under load) is sent
    again, to whichever node leads then; the re-send is idempotent."""
    for k, cid in enumerate(clients):
        update = write_update(fed.tmp_path / f"r{number}{cid}.safetensors", leader.spec,
                              seed + number * 10 + k)
        target = leader
        for attempt in range(3):
            try:
                async with fed.client(target, cid) as c:
                    await c.submit(update, examples=k + 1)
                break
            except (ServerError, ConflictError) as exc:
                if exc.code not in RESEND_CODES or attempt == 2:
                    raise
                target = await fed.one_coordinator(timeout=30)
    await wait_for(lambda: all((n.ledger.round(number) or {}).get("state") == "committed"
                               for n in fed.nodes.values()), timeout=15)


# -- node processes: where the claim is about a crash, a real kill -9 -----------------------------
FAST = ["--election-timeout", "0.5", "--min-updates", "1", "--round-deadline", "600"]


class Processes:
    """``chorus-node up`` processes on loopback, static peers to each other. For claims about
    a crash (``kill9`` is SIGKILL: nothing flushed, no goodbye); ``Federation`` runs nodes in
    this process, faster, for claims about what the other nodes do."""

    def __init__(self, tmp_path: Path, model: Path, n: int, extra: list[str] | None = None):
        self.ports = free_loopback_ports(n)
        first = init_data_dir(tmp_path / "p0", "procs")
        for i in range(1, n):
            init_data_dir(tmp_path / f"p{i}", join_token=first.join_token())
            # the operator closes rounds from whichever node leads: it holds the admin key
            copy_admin_key(tmp_path / "p0", tmp_path / f"p{i}")
        self.secret = first.secret
        self.dirs = [tmp_path / f"p{i}" for i in range(n)]
        self.model, self.extra = model, extra or []
        self.procs: dict[int, NodeProcess] = {}

    def start(self, i: int) -> NodeProcess:
        peers = [a for j, p in enumerate(self.ports) if j != i for a in ("--peer", f"127.0.0.1:{p}")]
        proc = NodeProcess(self.dirs[i], self.model, extra=[*FAST, *peers, *self.extra],
                           port=self.ports[i])
        proc.start()
        self.procs[i] = proc
        return proc

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def client(self, i: int, cid: str = "probe") -> NodeClient:
        return NodeClient(self.url(i), secret=self.secret, client_id=cid, timeout=20)

    def status(self, i: int) -> dict | None:
        try:
            with self.client(i) as c:
                return c.status()
        except (NodeError, NodeUnreachable, OSError):  # down, restarting or cut off: no
            return None  # answer; an error in this test's own code still shows

    def coordinator(self, among: list[int] | None = None, timeout: float = 30) -> int:
        among = list(self.procs) if among is None else among
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {i: self.status(i) for i in among}
            leaders = [i for i, s in states.items() if s and s["role"] == "coordinator"
                       and s["quorum"]]
            if len(leaders) == 1:
                return leaders[0]
            time.sleep(0.1)
        raise AssertionError("no single coordinator")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.kill9()


def committed_updates(data_dir: Path) -> list[tuple[int, str, str]]:
    """(round, client, blob) of every update in a committed round, read from a node's ledger
    file (read-only: the node may be running)."""
    con = sqlite3.connect(f"file:{data_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return con.execute("select u.round, u.node_id, u.blob_sha from updates u join rounds r "
                           "using (round) where r.state = 'committed'").fetchall()
    finally:
        con.close()


def wait_for_sync(predicate, timeout: float, what: str = "the condition") -> Any:
    """``wait_for`` for synchronous tests: poll until truthy, or fail saying what."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout:.0f} s")
