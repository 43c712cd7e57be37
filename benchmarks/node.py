"""Benchmark one node's round path on loopback: N clients submit, the round commits, one pulls.

What is measured, and why
-------------------------
A federation round on a node is: N clients upload their LoRA updates, the N-th accept closes the
round, the node aggregates the updates, commits the result to its ledger, and clients pull the
new global adapter. Aggregation itself is benchmarked in ``benchmarks/aggregate.py``; this
benchmark measures what the *node* adds around it - HTTP, authentication, validation, the blob
store, the SQLite ledger, scheduling - with a tiny model, so that the aggregation is cheap and
the node's own cost is what shows.

For each client count N (``--clients``, default ``2,10,50``), ``--repeats`` times (default 3),
each time with a fresh data dir and a fresh in-process :class:`~chorus_p2p.node.service.Node` on
``127.0.0.1`` (tiny Llama, rank 4, alpha 8, ``q_proj``/``v_proj``, ``min_updates = N`` so the
N-th accept closes round 1, round deadline far away):

1. **Submit throughput and latency.** N update files (bare safetensors with the federation's
   exact shapes) are written before the clock starts. N :class:`AsyncNodeClient` objects, each
   with its own HTTP session and client id, submit concurrently (``asyncio.gather``) to round 1
   with ``trained_from=0`` given, so each submit is exactly one signed upload (the SDK would
   otherwise first ask ``/v1/status``). Per-submit latency is ``submit()`` call to return
   (connection set-up included); throughput is N / (first submit start -> last submit return).
2. **Close -> commit -> pullable.** An extra client subscribes to the node's event WebSocket
   before the submits start. The *last accept* is the ``ts`` of the N-th ``update_accepted``
   event and *committed* is the ``ts`` of ``round_committed`` for round 1; both are stamped by the
   node, and the node runs in this process, so they share this process's clock and carry no
   WebSocket delivery delay. As soon as the subscriber receives ``round_committed`` it pulls
   round 1 (``pull(out_dir, round=1)``, archive download, hash check, extraction); *pulled* is the
   moment that returns, so last-accept -> pulled includes the event's delivery and the pull.
3. **Node overhead** = (last-accept -> committed) - the round's ``aggregation_ms`` (from
   ``GET /v1/rounds/1`` metrics: the time inside ``aggregate_adapters``). It is split into the part
   inside the aggregation worker thread but outside ``aggregate_adapters`` (``total_ms`` -
   ``aggregation_ms``: re-hashing stored updates, fsyncing the output, copying results into the
   blob store) and the part outside the worker (last-accept -> committed - ``total_ms``: closing the
   round in the ledger, task and thread hand-offs, the commit transaction). The target, node
   overhead < 100 ms at N = 10, is printed beside the figure as ``met`` / ``NOT met``.

Every figure in the summary is the median over the repeats (submit p50/p95 are per-repeat
percentiles, then the median of those). One untimed warm-up round (N = 2) runs first, so one-off
costs (lazy imports, first torch kernels) do not land in the first repeat; ``--no-warmup`` skips
it.

Caveats: clients and node share one process and one event loop (that is what "in-process" means
here), so client-side work (hashing, HTTP) competes with the node for the loop and the GIL; a
real deployment has clients on other machines. The node fsyncs blobs and runs SQLite with
``synchronous=FULL``, so timings depend on the disk under the temp dir (``--tmp-dir``).

Usage::

    python benchmarks/node.py                              # N = 2, 10, 50; 3 repeats each
    python benchmarks/node.py --clients 10 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from chorus_p2p.client import AsyncNodeClient
from chorus_p2p.trust.identity import init_data_dir
from chorus_p2p.node.service import Node
from chorus_p2p.node.settings import NodeSettings
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.tiny import quiet_transformers, save_tiny_model, write_random_update

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")
ROUND = 1                   # the round every run measures (the first after round 0)
OVERHEAD_TARGET_MS = 100.0  # node overhead target ...
TARGET_CLIENTS = 10         # ... at this client count
COMMIT_TIMEOUT_S = 120.0    # give up on a run whose round never commits
UPDATE_SCALE = 0.05


# --- setup helpers (standalone: nothing imported from tests/) ----------------------------------

def write_update(path: Path, spec: FederationSpec, seed: int) -> Path:
    return write_random_update(path, spec, seed)


def node_settings(data_dir: Path, model: Path, clients: int) -> NodeSettings:
    return NodeSettings(model=str(model), data_dir=str(data_dir), host="127.0.0.1", port=0,
                        rank=RANK, alpha=ALPHA, target_modules=TARGETS, min_updates=clients,
                        round_deadline=24 * 3600.0, mdns=False)  # loopback only: no multicast


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- one measured round --------------------------------------------------------------------------

@dataclass
class RunResult:
    clients: int
    submits_per_s: float
    submit_p50_ms: float
    submit_p95_ms: float
    accept_to_committed_ms: float  # node clock: N-th update_accepted -> round_committed
    accept_to_seen_ms: float       # ... -> round_committed received by the subscriber
    accept_to_pulled_ms: float     # ... -> pull() of the round returned
    pull_ms: float                 # the pull alone
    aggregation_ms: float          # round metrics: inside aggregate_adapters
    total_ms: float                # round metrics: the whole aggregation worker

    @property
    def overhead_ms(self) -> float:
        return self.accept_to_committed_ms - self.aggregation_ms

    @property
    def in_worker_overhead_ms(self) -> float:
        return self.total_ms - self.aggregation_ms

    @property
    def outside_worker_ms(self) -> float:
        return self.accept_to_committed_ms - self.total_ms


def make_client(node: Node, client_id: str) -> AsyncNodeClient:
    return AsyncNodeClient(node.url, secret=node.identity.secret, client_id=client_id)


async def observe_round(client: AsyncNodeClient, clients: int, subscribed: asyncio.Event,
                        pull_dir: Path) -> dict[str, float]:
    """Follow the event stream; pull round 1 the moment it is committed."""
    accepted_ts: list[float] = []
    stream = client.events()
    try:
        async for event in stream:
            kind, number = event["kind"], event["round"]
            if kind == "hello":
                subscribed.set()
            elif kind == "update_accepted" and number == ROUND:
                accepted_ts.append(event["ts"])
            elif kind == "aggregation_failed" and number == ROUND:
                raise RuntimeError(f"aggregation of round {ROUND} failed: {event['data']}")
            elif kind == "round_committed" and number == ROUND:
                seen = time.time()
                started = time.perf_counter()
                await client.pull(pull_dir, round=ROUND)
                pull_ms = (time.perf_counter() - started) * 1000
                pulled = time.time()
                if len(accepted_ts) != clients:
                    raise RuntimeError(f"saw {len(accepted_ts)} update_accepted events for round "
                                       f"{ROUND}, expected {clients}")
                last_accept = max(accepted_ts)
                return {"accept_to_committed_ms": (event["ts"] - last_accept) * 1000,
                        "accept_to_seen_ms": (seen - last_accept) * 1000,
                        "accept_to_pulled_ms": (pulled - last_accept) * 1000,
                        "pull_ms": pull_ms}
    finally:
        await stream.aclose()
    raise RuntimeError("the event stream closed before the round was committed")


async def timed_submit(client: AsyncNodeClient, update: Path, examples: int
                       ) -> tuple[float, float]:
    started = time.perf_counter()
    result = await client.submit(update, round=ROUND, examples=examples, trained_from=0)
    finished = time.perf_counter()
    if result.get("round") != ROUND or result.get("duplicate"):
        raise RuntimeError(f"unexpected submit answer for {client.client_id}: {result}")
    return started, finished


async def run_round(model: Path, spec: FederationSpec, updates: Sequence[Path], clients: int,
                    work: Path) -> RunResult:
    """Fresh data dir and node; N concurrent submits; wait for commit; pull; stop the node."""
    data_dir = work / "node"
    init_data_dir(data_dir, "bench")
    node = Node(node_settings(data_dir, model, clients))
    await node.start()
    submitters: list[AsyncNodeClient] = []
    try:
        if node.spec.fingerprint() != spec.fingerprint():
            raise RuntimeError("the node's federation spec differs from the one the updates "
                               "were generated for")
        async with make_client(node, "observer") as observer:
            subscribed = asyncio.Event()
            watcher = asyncio.create_task(
                observe_round(observer, clients, subscribed, work / "pulled"))
            try:
                await asyncio.wait_for(subscribed.wait(), timeout=30)
                submitters = [make_client(node, f"client-{i:03d}") for i in range(clients)]
                spans = await asyncio.gather(*(
                    timed_submit(c, updates[i], examples=100 + 10 * i)
                    for i, c in enumerate(submitters)))
                round_times = await asyncio.wait_for(watcher, timeout=COMMIT_TIMEOUT_S)
            finally:
                if not watcher.done():
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
            detail = await observer.round(ROUND)
        if detail["state"] != "committed" or detail["metrics"]["updates"] != clients:
            raise RuntimeError(f"round {ROUND} ended as {detail['state']} with "
                               f"{detail['metrics']}")
    finally:
        for c in submitters:
            await c.close()
        await node.stop()

    latencies_ms = [(end - start) * 1000 for start, end in spans]
    wall_s = max(end for _, end in spans) - min(start for start, _ in spans)
    metrics = detail["metrics"]
    return RunResult(clients=clients, submits_per_s=clients / wall_s,
                     submit_p50_ms=percentile(latencies_ms, 50),
                     submit_p95_ms=percentile(latencies_ms, 95),
                     aggregation_ms=float(metrics["aggregation_ms"]),
                     total_ms=float(metrics["total_ms"]), **round_times)


# --- reporting -----------------------------------------------------------------------------------

def median_result(runs: Sequence[RunResult]) -> RunResult:
    def med(name: str) -> float:
        return statistics.median(getattr(r, name) for r in runs)

    return RunResult(clients=runs[0].clients, submits_per_s=med("submits_per_s"),
                     submit_p50_ms=med("submit_p50_ms"), submit_p95_ms=med("submit_p95_ms"),
                     accept_to_committed_ms=med("accept_to_committed_ms"),
                     accept_to_seen_ms=med("accept_to_seen_ms"),
                     accept_to_pulled_ms=med("accept_to_pulled_ms"), pull_ms=med("pull_ms"),
                     aggregation_ms=med("aggregation_ms"), total_ms=med("total_ms"))


def run_line(index: int, r: RunResult) -> str:
    return (f"  run {index}: {r.submits_per_s:7.1f} submits/s  p50 {r.submit_p50_ms:6.1f} ms  "
            f"p95 {r.submit_p95_ms:6.1f} ms | ->committed {r.accept_to_committed_ms:6.1f} ms "
            f"(aggregation {r.aggregation_ms:5.1f}, worker {r.total_ms:5.1f}, overhead "
            f"{r.overhead_ms:5.1f}) | ->seen {r.accept_to_seen_ms:6.1f} ms | ->pulled "
            f"{r.accept_to_pulled_ms:6.1f} ms (pull {r.pull_ms:5.1f})")


def summary_lines(m: RunResult, repeats: int) -> list[str]:
    lines = [
        f"  median of {repeats}: submit {m.submits_per_s:.1f}/s, latency p50 "
        f"{m.submit_p50_ms:.1f} ms / p95 {m.submit_p95_ms:.1f} ms",
        f"  last accept -> committed {m.accept_to_committed_ms:.1f} ms = aggregation "
        f"{m.aggregation_ms:.1f} ms + node overhead {m.overhead_ms:.1f} ms",
        f"    overhead inside the aggregation worker (total_ms - aggregation_ms): "
        f"{m.in_worker_overhead_ms:.1f} ms",
        f"    overhead outside it (close, hand-offs, commit transaction):         "
        f"{m.outside_worker_ms:.1f} ms",
        f"  last accept -> commit seen by a subscriber {m.accept_to_seen_ms:.1f} ms -> pulled "
        f"{m.accept_to_pulled_ms:.1f} ms (pull alone {m.pull_ms:.1f} ms)",
    ]
    if m.clients == TARGET_CLIENTS:
        verdict = "met" if m.overhead_ms < OVERHEAD_TARGET_MS else "NOT met"
        lines.append(f"  target: node overhead < {OVERHEAD_TARGET_MS:.0f} ms at N="
                     f"{TARGET_CLIENTS}: {m.overhead_ms:.1f} ms -> {verdict}")
    return lines


def table(rows: Sequence[RunResult]) -> str:
    header = ("N", "submits/s", "submit p50 ms", "submit p95 ms", "last-accept->committed ms",
              "aggregation ms", "overhead ms", "->pullable ms")
    body = [(str(r.clients), f"{r.submits_per_s:.1f}", f"{r.submit_p50_ms:.1f}",
             f"{r.submit_p95_ms:.1f}", f"{r.accept_to_committed_ms:.1f}",
             f"{r.aggregation_ms:.1f}", f"{r.overhead_ms:.1f}", f"{r.accept_to_pulled_ms:.1f}")
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = " | ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*header), "-+-".join("-" * w for w in widths),
                      *(fmt.format(*b) for b in body)])


# --- driver --------------------------------------------------------------------------------------

async def benchmark(client_counts: Sequence[int], repeats: int, warmup: bool, root: Path) -> None:
    model = save_tiny_model(root / "tiny-llama")
    spec = FederationSpec.build(str(model), RANK, ALPHA, TARGETS)
    updates = [write_update(root / "updates" / f"client-{i:03d}.safetensors", spec, seed=1000 + i)
               for i in range(max(client_counts))]
    size = updates[0].stat().st_size
    print(f"tiny Llama: {len(spec.modules)} target modules, rank {RANK}; each update "
          f"{size} bytes; {len(updates)} update files written before timing\n")

    if warmup:
        work = Path(tempfile.mkdtemp(prefix="warmup-", dir=root))
        await run_round(model, spec, updates, 2, work)
        shutil.rmtree(work, ignore_errors=True)
        print("warm-up round (N=2) done, not reported\n")

    medians: list[RunResult] = []
    for clients in client_counts:
        print(f"N={clients} clients")
        runs = []
        for index in range(1, repeats + 1):
            work = Path(tempfile.mkdtemp(prefix=f"n{clients}-r{index}-", dir=root))
            try:
                result = await run_round(model, spec, updates, clients, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            runs.append(result)
            print(run_line(index, result), flush=True)
        median = median_result(runs)
        medians.append(median)
        print("\n".join(summary_lines(median, repeats)) + "\n", flush=True)

    print(f"summary (median of {repeats} run(s) per N; overhead = last-accept->committed - "
          f"aggregation_ms)")
    print(table(medians))
    target = next((m for m in medians if m.clients == TARGET_CLIENTS), None)
    if target is not None:
        verdict = "met" if target.overhead_ms < OVERHEAD_TARGET_MS else "NOT met"
        print(f"\nnode overhead at N={TARGET_CLIENTS}: {target.overhead_ms:.1f} ms "
              f"(target < {OVERHEAD_TARGET_MS:.0f} ms): {verdict}")
    else:
        print(f"\n(the overhead target is for N={TARGET_CLIENTS}, which this run did not include)")


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("client counts must be positive")
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=parse_counts, default=[2, 10, 50],
                        help="comma-separated client counts N (default 2,10,50)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh-node rounds per N; medians are reported (default 3)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up round")
    parser.add_argument("--tmp-dir", default=None,
                        help="where the model, updates and data dirs go (default: system temp)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    quiet_transformers()
    root = Path(tempfile.mkdtemp(prefix="chorus-node-bench-", dir=args.tmp_dir))
    print(f"chorus-p2p node benchmark: python {platform.python_version()}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
          f"temp dir {root}")
    print(f"clients {','.join(map(str, args.clients))}, {args.repeats} repeat(s) each; node and "
          f"clients in one process on 127.0.0.1\n")
    started = time.perf_counter()
    try:
        asyncio.run(benchmark(args.clients, args.repeats, not args.no_warmup, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n(total wall time {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
