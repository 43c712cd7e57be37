"""Helpers for node tests: in-process nodes on loopback, node subprocesses, quick adapters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from chorus_p2p.node.identity import init_data_dir
from chorus_p2p.node.service import Node
from chorus_p2p.node.settings import NodeSettings
from chorus_p2p.node.spec import FederationSpec
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
                 extra: list[str] | None = None):
        self.data_dir, self.model = data_dir, model
        self.env = {**os.environ, **(env or {})}
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.lines: list[dict] = []

    def start(self, timeout: float = 60.0) -> str:
        cmd = [sys.executable, "-m", "chorus_p2p.cli.main", "up", "--headless", "--port", "0",
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
