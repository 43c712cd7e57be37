"""What ``up --eval-data`` costs a training node: the tiny-model round with and without it.

One node on loopback (tiny model, no mDNS, min_updates 1, the same training settings), run for
``--rounds`` committed rounds twice: without evaluation, then with ``--eval-data`` (every
round). Prints the median seconds between commits for both, the median evaluation time, and
the ratio. Target (issue 21): evaluation adds 10% or less to a tiny-model round.

Usage::

    python benchmarks/node_eval.py [--rounds 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


async def rounds_with(model: Path, work: Path, rounds: int, steps: int, evaluate: bool
                      ) -> tuple[list[float], list[float]]:
    from chorus_p2p.trust.identity import init_data_dir
    from chorus_p2p.node.service import Node
    from chorus_p2p.node.settings import NodeSettings

    init_data_dir(work, "bench")
    settings = NodeSettings(model=str(model), data_dir=str(work), host="127.0.0.1", port=0,
                            rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"),
                            min_updates=1, mdns=False, train=True,
                            dataset=str(DATA / "kitchen.jsonl"), steps=steps,
                            eval_data=str(DATA / "weather.jsonl") if evaluate else None)
    node = Node(settings)
    await node.start()
    try:
        deadline = time.monotonic() + 600
        while (node.ledger.latest_committed() or {"round": 0})["round"] < rounds + 1:
            if time.monotonic() > deadline:
                raise RuntimeError("rounds did not commit within 600 s")
            await asyncio.sleep(0.2)
        stamps = [node.ledger.round(n)["committed_at"] for n in range(1, rounds + 2)]
        evals = [m[node.node_id]["seconds"] for m in node.ledger.evaluations().values()
                 if node.node_id in m]
    finally:
        await node.stop()
    return [b - a for a, b in zip(stamps, stamps[1:])], evals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from chorus_p2p.tiny import quiet_transformers
    from chorus_p2p.train.tiny_lm import build_tiny_lm

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_lm(Path(tmp) / "tiny", [DATA / "kitchen.jsonl", DATA / "weather.jsonl",
                                                    DATA / "workshop.jsonl"],
                              pretrain_steps=30, log=lambda m: None)
        plain, _ = asyncio.run(rounds_with(model, Path(tmp) / "plain", args.rounds, args.steps,
                                           False))
        timed, evals = asyncio.run(rounds_with(model, Path(tmp) / "eval", args.rounds,
                                               args.steps, True))
    base, with_eval = statistics.median(plain), statistics.median(timed)
    load = os.getloadavg()[0]
    print(f"tiny model, {args.steps} steps per round, {args.rounds} rounds, load {load:.2f}, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"  seconds between commits, no evaluation:   {base:.3f} (median)")
    print(f"  seconds between commits, --eval-data:     {with_eval:.3f} (median)")
    print(f"  evaluation itself:                        {statistics.median(evals):.3f} s "
          f"(median of {len(evals)})")
    print(f"  ratio with/without: {with_eval / base:.3f}x (target <= 1.10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
