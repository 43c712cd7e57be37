"""Benchmark a long federation through a real node: state exactness, update cost, disk, memory.

What is measured, and why
-------------------------
Real federated fine-tuning runs for 100-200 rounds. A node keeps the federation's folded base
``R`` as a dense float32 state updated in place with each round's factored ``D``, checkpoints it
every ``--checkpoint-every`` rounds and keeps the blobs of the last ``--keep-rounds`` rounds (see
README, "State over many rounds"). This benchmark runs that for many rounds through the node's
own code path: a ``chorus-node up`` **subprocess** on loopback (its RSS is its own), clients
submitting over HTTP with the SDK, the node aggregating, committing, updating its state,
checkpointing and collecting garbage exactly as in production.

Phase A (the issue's setting): ``--rounds`` (200) rounds, 5 clients a round, random rank-16
adapters, one layer of Llama-3.2-1B shapes (q/o 2048x2048, k/v 512x2048; a config-only model
folder, no weights). Per round it prints

- the round's aggregation (``total_ms``: everything the node does in its aggregation worker),
- the state update (``apply``: marker, in-place ``R += L @ Rt`` per module, fsync, fingerprint)
  and the checkpoint (when one is written; amortised over ``--checkpoint-every`` rounds in the
  ratio),
- ``ratio`` = (apply + checkpoint / checkpoint_every) / aggregation,
- the data dir's bytes on disk (allocated blocks),
- every 10 rounds, the relative error ``||R_node - sum_t D_t||_F / ||sum_t D_t||_F`` against a
  float64 sum of every round's ``D`` (downloaded from the node as it commits).

At the end: peak RSS of the node process (``VmHWM``) against its idle RSS after start, error
after the last round, ratio early vs late (flat?), disk flat once the window is full.

Phase B (for the extrapolation): ``--rounds-3b`` (30) rounds with 10 clients on one layer of
Llama-3.2-3B shapes (q/o 3072x3072, k/v 1024x3072). Both the aggregation and the state update
scale linearly in the layer count, so the per-layer ratio measured here is the 28-layer ratio;
times, disk and the dense state are multiplied by 28 for a Llama-3.2-3B federation on q,k,v,o.

Usage::

    python benchmarks/long_run.py                    # 200 rounds + 30 at 3B shapes (~4 min)
    python benchmarks/long_run.py --rounds 40 --rounds-3b 12
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chorus_p2p.client import AsyncNodeClient
from chorus_p2p.lora.residual import ResidualFile
from chorus_p2p.trust.identity import init_data_dir, load_identity
from chorus_p2p.node.retention import data_dir_bytes
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.tiny import write_random_update

MB = 1e6
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LAYERS_3B = 28
ERROR_TARGET = 1e-5
RATIO_TARGET = 1.0
RSS_SLACK_MB = 300


@dataclass
class Shapes:
    name: str
    hidden: int
    kv_heads: int
    heads: int


LLAMA_1B = Shapes("Llama-3.2-1B layer", 2048, 8, 32)
LLAMA_3B = Shapes("Llama-3.2-3B layer", 3072, 8, 24)


@dataclass
class RoundFigures:
    round: int
    aggregation_ms: float
    apply_ms: float
    checkpoint_ms: float | None
    disk_bytes: int
    error: float | None = None


@dataclass
class Run:
    shapes: Shapes
    clients: int
    rounds: list[RoundFigures] = field(default_factory=list)
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    largest_module_mb: float = 0.0
    state_mb: float = 0.0


def model_folder(root: Path, shapes: Shapes) -> Path:
    """A config-only Llama folder: the node reads module shapes from it on the meta device."""
    from transformers import LlamaConfig

    folder = root / shapes.name.replace(" ", "-")
    LlamaConfig(hidden_size=shapes.hidden, intermediate_size=4 * shapes.hidden,
                num_hidden_layers=1, num_attention_heads=shapes.heads,
                num_key_value_heads=shapes.kv_heads, vocab_size=1024,
                head_dim=shapes.hidden // shapes.heads).save_pretrained(folder)
    return folder


def rss_mb(pid: int, field_name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_node(data_dir: Path, model: Path, args: argparse.Namespace, clients: int
               ) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "chorus_p2p.cli.main", "up", "--headless", "--no-mdns",
           "--port", "0", "--data-dir", str(data_dir), "--model", str(model), "--rank", "16",
           "--alpha", "32", "--target-modules", ",".join(TARGETS), "--min-updates", str(clients),
           "--keep-rounds", str(args.keep_rounds), "--checkpoint-every",
           str(args.checkpoint_every), "--rate-limit", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        record = json.loads(line)
        if record.get("event") == "listening":
            # Keep reading its log: a full pipe would stall the node on its next log line.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, record["data"]["url"]
    raise RuntimeError("the node did not start")


def state_error(data_dir: Path, exact: dict[str, torch.Tensor]) -> float:
    with ResidualFile(data_dir / "state" / "working.safetensors") as state:
        num = den = 0.0
        for prefix, want in exact.items():
            num += float((state.delta(prefix).double() - want).pow(2).sum())
            den += float(want.pow(2).sum())
    return (num / den) ** 0.5


async def wait_state(client: AsyncNodeClient, number: int, every: int) -> dict:
    while True:
        state = await client.state()
        checkpointed = number % every != 0 or (state["checkpoint"] or {}).get("round") == number
        if state["round"] >= number and checkpointed and state["verified_round"] == number:
            return state
        await asyncio.sleep(0.01)


async def run_phase(shapes: Shapes, clients: int, rounds: int, args: argparse.Namespace,
                    root: Path, verbose: bool) -> Run:
    model = model_folder(root, shapes)
    spec = FederationSpec.build(str(model), 16, 32.0, TARGETS)
    data_dir = root / f"node-{shapes.hidden}"
    init_data_dir(data_dir, "longrun")
    secret = load_identity(data_dir).secret
    proc, url = start_node(data_dir, model, args, clients)
    run = Run(shapes, clients)
    run.largest_module_mb = max(o * i * 4 for o, i in spec.modules.values()) / MB
    run.state_mb = sum(o * i * 4 for o, i in spec.modules.values()) / MB
    exact = {p: torch.zeros(s, dtype=torch.float64) for p, s in spec.modules.items()}
    updates = root / "updates"
    try:
        await asyncio.sleep(0.5)
        run.idle_rss_mb = rss_mb(proc.pid, "VmRSS")
        submitters = [AsyncNodeClient(url, secret=secret, client_id=f"c{i}")
                      for i in range(clients)]
        reader = AsyncNodeClient(url, secret=secret, client_id="bench")
        try:
            for number in range(1, rounds + 1):
                files = [write_random_update(updates / f"{i}.safetensors", spec,
                                             seed=number * 1000 + i, scale=0.02)
                         for i in range(clients)]
                await asyncio.gather(*(c.submit(f, round=number, examples=10 + i,
                                                trained_from=number - 1)
                                       for i, (c, f) in enumerate(zip(submitters, files))))
                state = await wait_state(reader, number, args.checkpoint_every)
                detail = await reader.round(number)
                await reader.download("residual", number, root / "D.safetensors", force=True)
                with ResidualFile(root / "D.safetensors") as residual:
                    for prefix in residual.modules:
                        left, right = residual.factors(prefix)
                        exact[prefix] += left.double() @ right.double()
                figures = RoundFigures(
                    number, detail["metrics"]["total_ms"], state["last_apply_ms"],
                    state["last_checkpoint_ms"] if number % args.checkpoint_every == 0 else None,
                    data_dir_bytes(data_dir))
                if number % 10 == 0 or number == rounds:
                    figures.error = state_error(data_dir, exact)
                run.rounds.append(figures)
                if verbose:
                    print(format_round(figures, args.checkpoint_every), flush=True)
        finally:
            for c in (*submitters, reader):
                await c.close()
        run.peak_rss_mb = rss_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return run


def ratio(f: RoundFigures, every: int, checkpoint_ms: float) -> float:
    return (f.apply_ms + checkpoint_ms / every) / f.aggregation_ms


def format_round(f: RoundFigures, every: int) -> str:
    ckpt = f"{f.checkpoint_ms:7.1f}" if f.checkpoint_ms is not None else "      -"
    err = f"  error {f.error:.2e}" if f.error is not None else ""
    return (f"  round {f.round:>4}  aggregation {f.aggregation_ms:7.1f} ms  apply "
            f"{f.apply_ms:6.1f} ms  checkpoint {ckpt} ms  disk {f.disk_bytes / MB:7.1f} MB{err}")


def summarize(run: Run, every: int) -> dict[str, float]:
    checkpoints = [f.checkpoint_ms for f in run.rounds if f.checkpoint_ms is not None]
    ckpt = statistics.median(checkpoints) if checkpoints else 0.0
    ratios = [ratio(f, every, ckpt) for f in run.rounds]
    window = max(1, len(run.rounds) // 10)
    return {
        "aggregation_ms": statistics.median(f.aggregation_ms for f in run.rounds),
        "apply_ms": statistics.median(f.apply_ms for f in run.rounds),
        "checkpoint_ms": ckpt,
        "ratio": statistics.median(ratios),
        "ratio_first": statistics.median(ratios[:window]),
        "ratio_last": statistics.median(ratios[-window:]),
        "error": run.rounds[-1].error or float("nan"),
        "disk_mid_mb": run.rounds[len(run.rounds) // 2].disk_bytes / MB,
        "disk_end_mb": run.rounds[-1].disk_bytes / MB,
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rounds-3b", type=int, default=30)
    parser.add_argument("--keep-rounds", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--tmp-dir", help="where the data dirs go (default: system temp)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"long federation through a node: {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {load[0]:.2f} at start")
    print(f"retention: --keep-rounds {args.keep_rounds}, --checkpoint-every "
          f"{args.checkpoint_every}\n")
    with tempfile.TemporaryDirectory(prefix="chorus-longrun-", dir=args.tmp_dir) as tmp:
        root = Path(tmp)
        print(f"[A] {args.rounds} rounds, 5 rank-16 clients, one {LLAMA_1B.name} "
              "(q/o 2048x2048, k/v 512x2048)")
        a = asyncio.run(run_phase(LLAMA_1B, 5, args.rounds, args, root / "a", True))
        print(f"\n[B] {args.rounds_3b} rounds, 10 rank-16 clients, one {LLAMA_3B.name} "
              "(q/o 3072x3072, k/v 1024x3072), for the extrapolation")
        b = asyncio.run(run_phase(LLAMA_3B, 10, args.rounds_3b, args, root / "b", False))
    sa, sb = summarize(a, args.checkpoint_every), summarize(b, args.checkpoint_every)
    rss_a = a.peak_rss_mb - a.idle_rss_mb
    print(f"\nsummary [A] ({a.shapes.name}, {len(a.rounds)} rounds)")
    print(f"  error of R vs float64 sum of all D's   {sa['error']:.2e}    target <= "
          f"{ERROR_TARGET:g}: {verdict(sa['error'] <= ERROR_TARGET)}")
    print(f"  aggregation per round (median)         {sa['aggregation_ms']:.1f} ms")
    print(f"  state update per round (median)        {sa['apply_ms']:.1f} ms + checkpoint "
          f"{sa['checkpoint_ms']:.1f} ms every {args.checkpoint_every} rounds")
    print(f"  update / aggregation                   {sa['ratio']:.2f}x  (first 10%: "
          f"{sa['ratio_first']:.2f}x, last 10%: {sa['ratio_last']:.2f}x)   target <= "
          f"{RATIO_TARGET:g}x: {verdict(sa['ratio'] <= RATIO_TARGET)}")
    print(f"  node RSS idle -> peak                  {a.idle_rss_mb:.0f} -> {a.peak_rss_mb:.0f} MB"
          f" (+{rss_a:.0f} MB; largest module's state {a.largest_module_mb:.1f} MB)   target <= "
          f"module + {RSS_SLACK_MB} MB: {verdict(rss_a <= a.largest_module_mb + RSS_SLACK_MB)}")
    print(f"  data dir on disk, round {len(a.rounds) // 2} -> {len(a.rounds)}"
          f"          {sa['disk_mid_mb']:.1f} -> {sa['disk_end_mb']:.1f} MB (dense state "
          f"{a.state_mb:.1f} MB)")
    print(f"\nsummary [B] ({b.shapes.name}, 10 clients, {len(b.rounds)} rounds)")
    print(f"  aggregation {sb['aggregation_ms']:.1f} ms, state update {sb['apply_ms']:.1f} ms + "
          f"checkpoint {sb['checkpoint_ms']:.1f} ms / {args.checkpoint_every}: "
          f"ratio {sb['ratio']:.2f}x; error {sb['error']:.2e}; disk at the end "
          f"{sb['disk_end_mb']:.1f} MB; RSS +{b.peak_rss_mb - b.idle_rss_mb:.0f} MB")
    print(f"\nextrapolated to Llama-3.2-3B, {LAYERS_3B} layers x q,k,v,o, 10 clients, "
          f"--keep-rounds {args.keep_rounds} (x{LAYERS_3B} of [B])")
    print(f"  dense state R                          {b.state_mb * LAYERS_3B / 1e3:.2f} GB "
          f"(working file; + one checkpoint of the same size)")
    print(f"  per round: aggregation {sb['aggregation_ms'] * LAYERS_3B / 1e3:.2f} s, state update "
          f"{sb['apply_ms'] * LAYERS_3B / 1e3:.2f} s (+ checkpoint "
          f"{sb['checkpoint_ms'] * LAYERS_3B / 1e3:.2f} s every {args.checkpoint_every} rounds): "
          f"ratio {sb['ratio']:.2f}x")
    disk_3b = sb["disk_end_mb"] * LAYERS_3B / 1e3
    print(f"  data dir, flat after {args.keep_rounds} rounds           {disk_3b:.1f} GB "
          f"(200 rounds: the same)   target < 15 GB: {verdict(disk_3b < 15)}")
    print(f"  peak RSS of the update                 one module's state "
          f"({b.largest_module_mb:.1f} MB) + factors; measured +"
          f"{b.peak_rss_mb - b.idle_rss_mb:.0f} MB over idle for the whole node")
    return 0


if __name__ == "__main__":
    sys.exit(main())
