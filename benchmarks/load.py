"""Load and abuse against one node: is it still fast for the honest, and does it hold?

One ``chorus-node up`` subprocess on loopback (its RSS is its own; tiny model), and in this
process, for ``--seconds`` (30):

- 100 honest submitters, each uploading one update to the open round (the round needs more than
  100, so it stays open; it is closed at the end);
- 200 status readers, each calling ``GET /v1/status`` once a second (a dashboard's pace; 200 of
  them is 200 requests a second);
- 50 hostile clients: 20 unauthenticated floods (``GET /v1/status`` without credentials, as fast
  as they can), 20 slowloris (connections sending half a request line and then nothing,
  reopened whenever the node closes them), 10 gzip bombers (64 MiB of zeros compressed to
  64 KiB, posted again and again without credentials);
- a probe calling ``GET /v1/health`` every 20 ms.

It prints p50/p99 of ``/v1/health`` and ``/v1/status``, how many honest submits were
acknowledged (201 with ``durable``), what the hostile clients got, and the node's RSS at start,
peak and end. Targets: health p99 < 100 ms, every honest submit acknowledged, RSS flat.
The node runs at its default rate limits (100/s per caller, 400/s per address for authenticated
requests, and a separate 400/s per address for refused ones): this driver sends all its honest
traffic from one address (127.0.0.1), which a real lab does not; the hostile clients come from
127.0.0.2. ``--hostile-scale 2`` doubles them.

Usage::

    python benchmarks/load.py
    python benchmarks/load.py --seconds 60 --readers 100
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

from chorus_p2p.client import AsyncNodeClient, NodeError, NodeUnreachable
from chorus_p2p.trust.identity import init_data_dir, load_identity
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.tiny import quiet_transformers, save_tiny_model, write_random_update

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")
HOSTILE = "127.0.0.2"  # the attackers' source address (all of 127.0.0.0/8 is loopback)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Load:
    def __init__(self, url: str, secret: bytes, spec: FederationSpec, tmp: Path, seconds: float):
        self.url, self.secret, self.spec, self.tmp, self.seconds = url, secret, spec, tmp, seconds
        self.host, self.port = url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])
        self.stop = asyncio.Event()
        self.health: list[float] = []
        self.status: list[float] = []
        self.status_errors = 0
        self.submits: dict[str, str] = {}
        self.hostile: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.hostile[what] = self.hostile.get(what, 0) + 1

    async def probe(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    async with session.get(self.url + "/v1/health",
                                           timeout=aiohttp.ClientTimeout(total=10)) as r:
                        await r.read()
                    self.health.append(time.perf_counter() - started)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    self.health.append(10.0)
                await asyncio.sleep(0.02)

    async def reader(self, k: int) -> None:
        await asyncio.sleep(k / 200)  # spread over a second
        async with AsyncNodeClient(self.url, secret=self.secret, client_id=f"reader{k}",
                                   timeout=30) as c:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    await c.status()
                    self.status.append(time.perf_counter() - started)
                except (NodeError, NodeUnreachable):
                    self.status_errors += 1
                await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))

    async def submitter(self, k: int) -> None:
        path = write_random_update(self.tmp / f"u{k}.safetensors", self.spec, 1000 + k)
        await asyncio.sleep(k * self.seconds / 200)  # spread over the first half of the run
        async with AsyncNodeClient(self.url, secret=self.secret, client_id=f"client{k}",
                                   timeout=120) as c:
            try:
                answer = await c.submit(path, round=1, examples=1, trained_from=0)
                self.submits[f"client{k}"] = "acknowledged" if answer["durable"] else "not durable"
            except (NodeError, NodeUnreachable) as exc:
                self.submits[f"client{k}"] = f"failed: {exc}"

    def hostile_session(self) -> aiohttp.ClientSession:
        # From another loopback address, as an attacker is another machine: the node limits
        # per source address, which must not punish the honest clients for the flood.
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(HOSTILE, 0)))

    async def flood(self) -> None:
        async with self.hostile_session() as session:
            while not self.stop.is_set():
                try:
                    async with session.get(self.url + "/v1/status") as r:
                        await r.read()
                        self.count(f"flood {r.status}")
                except aiohttp.ClientError:
                    self.count("flood dropped")

    async def slowloris(self) -> None:
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port,
                                                               local_addr=(HOSTILE, 0))
                writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                await writer.drain()
                try:
                    await asyncio.wait_for(reader.read(1), timeout=self.seconds)
                    self.count("slowloris closed by the node")
                except asyncio.TimeoutError:
                    self.count("slowloris still open")
                writer.close()
            except OSError:
                self.count("slowloris refused")
                await asyncio.sleep(0.5)

    async def bomber(self, bomb: bytes) -> None:
        async with self.hostile_session() as session:
            while not self.stop.is_set():
                try:
                    async with session.post(self.url + "/v1/rounds/1/updates?examples=1&"
                                            "trained_from=0", data=bomb,
                                            headers={"Content-Encoding": "gzip"}) as r:
                        self.count(f"gzip bomb {r.status}")
                except aiohttp.ClientError:
                    self.count("gzip bomb dropped")
                await asyncio.sleep(0.1)

    async def run(self, submitters: int, readers: int, hostile_scale: int = 1) -> None:
        bomb = gzip.compress(b"\0" * (64 << 20))
        tasks = [asyncio.ensure_future(self.probe())]
        tasks += [asyncio.ensure_future(self.reader(k)) for k in range(readers)]
        tasks += [asyncio.ensure_future(self.flood()) for _ in range(20 * hostile_scale)]
        tasks += [asyncio.ensure_future(self.slowloris()) for _ in range(20 * hostile_scale)]
        tasks += [asyncio.ensure_future(self.bomber(bomb)) for _ in range(10 * hostile_scale)]
        honest = [asyncio.ensure_future(self.submitter(k)) for k in range(submitters)]
        await asyncio.sleep(self.seconds)
        await asyncio.gather(*honest)
        self.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--submitters", type=int, default=100)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--hostile-scale", type=int, default=1,
                        help="multiply the 50 hostile clients (2: 100 of them)")
    args = parser.parse_args()
    quiet_transformers()
    print(f"load: {args.submitters} submitters + {args.readers} readers + "
          f"{50 * args.hostile_scale} hostile, default rate limits, "
          f"{args.seconds:g} s; {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="chorus-load-") as tmp:
        root = Path(tmp)
        model = save_tiny_model(root / "model")
        spec = FederationSpec.build(str(model), RANK, ALPHA, TARGETS)
        data = root / "node"
        init_data_dir(data, "load")
        cmd = [sys.executable, "-m", "chorus_p2p.cli.main", "up", "--headless", "--no-mdns",
               "--port", "0", "--data-dir", str(data), "--model", str(model), "--rank",
               str(RANK), "--alpha", str(ALPHA), "--target-modules", ",".join(TARGETS),
               "--min-updates", str(args.submitters + 1)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        url = None
        for line in proc.stdout:
            record = json.loads(line)
            if record.get("event") == "listening":
                url = record["data"]["url"]
                break
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        rss = [rss_mb(proc.pid)]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(1.0):
                rss.append(rss_mb(proc.pid))
        threading.Thread(target=sample, daemon=True).start()
        load = Load(url, load_identity(data).secret, spec, root, args.seconds)
        try:
            asyncio.run(load.run(args.submitters, args.readers, args.hostile_scale))
            time.sleep(2.0)
            rss.append(rss_mb(proc.pid))
        finally:
            sampling.set()
            proc.terminate()
            proc.wait(timeout=60)
    health_ms = [h * 1000 for h in load.health]
    status_ms = [s * 1000 for s in load.status]
    acked = sum(1 for v in load.submits.values() if v == "acknowledged")
    p99 = percentile(health_ms, 0.99)
    print(f"  /v1/health  p50 {statistics.median(health_ms):7.1f} ms   p99 {p99:7.1f} ms   "
          f"({len(health_ms)} probes)   target p99 < 100 ms: {'met' if p99 < 100 else 'NOT met'}")
    print(f"  /v1/status  p50 {statistics.median(status_ms):7.1f} ms   p99 "
          f"{percentile(status_ms, 0.99):7.1f} ms   ({len(status_ms)} calls, "
          f"{load.status_errors} errors)")
    print(f"  honest submits acknowledged  {acked}/{args.submitters}   target all: "
          f"{'met' if acked == args.submitters else 'NOT met'}")
    for problem in sorted({v for v in load.submits.values() if v != "acknowledged"}):
        print(f"    {problem}")
    print("  hostile clients got: " + ", ".join(f"{k} x{v}" for k, v in
                                                 sorted(load.hostile.items())))
    flat = rss[-1] <= rss[0] * 1.5 + 50
    print(f"  node RSS  start {rss[0]:.0f} MB, peak {max(rss):.0f} MB, end {rss[-1]:.0f} MB   "
          f"flat: {'yes' if flat else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
