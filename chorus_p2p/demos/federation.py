"""``chorus-node demo``: a 3-node federation on this machine, learning for real, offline.

Three nodes on loopback (static peers, no multicast) elect a coordinator; each trains the tiny
Llama (built locally, tokenizer included) on its own shard of ``examples/data/`` every round and
submits; the coordinator aggregates exactly and every node replicates the result. After each
round we print the global model's held-out loss on every shard, the aggregation time and the
residual energy ``||D|| / ||M||``. ``--compare`` runs the same federation with ``fedavg`` and
plots both.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from chorus_p2p.netlab import free_loopback_ports
from chorus_p2p.trust.identity import init_data_dir
from chorus_p2p.node.service import Node
from chorus_p2p.node.settings import NodeSettings
from chorus_p2p.tiny import quiet_transformers
from chorus_p2p.train.data import Dataset
from chorus_p2p.node.participant import materialize_round
from chorus_p2p.train.simulate import DEMO_TARGETS, RoundStats, format_round, plot_history
from chorus_p2p.train.tiny_lm import build_tiny_lm
from chorus_p2p.train.trainer import TrainConfig, eval_global

def _demo_data_dir() -> Path:
    """The shipped shards: package data (``chorus_p2p.demo_data``, the repository's
    ``examples/data`` folder), so an installed wheel finds them outside any checkout."""
    from importlib.resources import files

    return Path(str(files("chorus_p2p.demo_data")))


DATA_DIR = _demo_data_dir()
SHARDS = ("kitchen", "weather", "workshop")


def shard_paths(data_dir: Path = DATA_DIR) -> list[Path]:
    paths = [data_dir / f"{name}.jsonl" for name in SHARDS]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"demo data missing: {', '.join(missing)}")
    return paths


def ensure_tiny_model(workdir: Path) -> Path:
    model = workdir / "tiny-llama"
    if not (model / "config.json").exists():
        print(f"building the tiny Llama + BPE tokenizer from examples/data -> {model}")
        build_tiny_lm(model, shard_paths(), pretrain_steps=30,
                      log=lambda m: print(f"  {m}"))
    return model


async def run_federation(workdir: Path, model: Path, strategy: str, rounds: int,
                         config: TrainConfig, serve: bool = False) -> list[RoundStats]:
    shards = shard_paths()
    datasets = [Dataset.load(p) for p in shards]
    fed_dir = workdir / f"federation-{strategy}"
    shutil.rmtree(fed_dir, ignore_errors=True)  # a fresh federation every run
    shutil.rmtree(workdir / f"eval-{strategy}", ignore_errors=True)
    first = init_data_dir(fed_dir / "node0", f"demo-{strategy}")
    for i in (1, 2):
        init_data_dir(fed_dir / f"node{i}", join_token=first.join_token())
    ports = free_loopback_ports(3)
    nodes: list[Node] = []
    for i in range(3):
        settings = NodeSettings(
            model=str(model), data_dir=str(fed_dir / f"node{i}"), host="127.0.0.1",
            port=ports[i], strategy=strategy, rank=8, alpha=16.0, target_modules=DEMO_TARGETS,
            min_updates=3, round_deadline=300.0, mdns=False, election_timeout=0.5,
            peers=tuple(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i),
            train=True, dataset=str(shards[i]), steps=config.steps, lr=config.lr,
            batch_size=config.batch_size)
        node = Node(settings)
        await node.start()
        nodes.append(node)
    history: list[RoundStats] = []
    try:
        leader = await _wait(lambda: next((n for n in nodes if n.cluster.role == "coordinator"),
                                          None), 30, "a coordinator")
        print(f"  3 nodes up on 127.0.0.1:{','.join(map(str, ports))}; coordinator "
              f"{leader.node_id[:12]} (term {leader.cluster.term}), strategy {strategy}")
        adapter_dir, residual = await materialize_round(nodes[0], 0, workdir / f"eval-{strategy}")
        start = await asyncio.to_thread(eval_global, model, adapter_dir, residual, datasets, config)
        print("  round 0  eval loss: " + "  ".join(f"{k} {v:.3f}" for k, v in start.items())
              + f"  (mean {sum(start.values()) / len(start):.3f})  the shared starting point")
        for number in range(1, rounds + 1):
            await _wait(lambda: all((n.ledger.round(number) or {}).get("state") == "committed"
                                    for n in nodes), 300, f"round {number} on every node")
            if number == rounds and not serve:
                for n in nodes:  # no round after the last: stop training
                    if n.rounds.is_coordinator:
                        n.rounds.decide_pause(True)
            row = nodes[0].ledger.round(number)
            adapter_dir, residual = await materialize_round(nodes[0], number, workdir / f"eval-{strategy}")
            losses = await asyncio.to_thread(eval_global, model, adapter_dir, residual, datasets,
                                             config)
            metrics = row["metrics"] or {}
            stats = RoundStats(number, strategy, losses, float(metrics.get("aggregation_ms", 0.0)),
                               metrics.get("residual_energy"))
            history.append(stats)
            print(f"  {format_round(stats)}")
        same_log = {n.ledger.round(rounds)["log_hash"] for n in nodes}
        await asyncio.gather(*(n.state.reader(rounds) for n in nodes))  # each state caught up
        same_state = all(n.state.verified_round == rounds for n in nodes)
        print(f"  all 3 nodes hold the same {rounds + 1} committed rounds and an R that matches "
              f"their fingerprint: {'yes' if len(same_log) == 1 and same_state else 'NO'}")
        if serve:
            leader = next((n for n in nodes if n.cluster.role == "coordinator"), nodes[0])
            print("\nthe federation keeps training; watch it live from another terminal with\n"
                  f"  chorus-node tui --node {leader.url} --data-dir {leader.data_dir}\n"
                  "Ctrl-C stops all three nodes.", flush=True)
            await _until_signalled()
    finally:
        for node in nodes:
            await node.stop()
    return history


async def _until_signalled() -> None:
    """Wait for Ctrl-C or SIGTERM. Handlers are installed explicitly: a process started in the
    background by a non-interactive shell inherits SIGINT as *ignored*, and would never stop."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise TimeoutError(f"demo: timed out waiting for {what}")


def run_federation_demo(rounds: int = 5, compare: bool = False, workdir: str | None = None,
                        steps: int = 30, lr: float = 1e-3, plot: str | None = None,
                        serve: bool = False) -> dict[str, list[RoundStats]]:
    """Run the demo; returns each strategy's per-round results (the printed table)."""
    import logging

    quiet_transformers()
    # The demo prints its own summary; routine refusals (a follower redirecting an upload) and
    # handovers at shutdown are not news here.
    logging.getLogger("chorus_p2p").setLevel(logging.ERROR)
    started = time.perf_counter()
    config = TrainConfig(steps=steps, lr=lr)
    with tempfile.TemporaryDirectory(prefix="chorus-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = ensure_tiny_model(root)
        histories = {}
        for strategy in (("fedex-svd", "fedavg") if compare else ("fedex-svd",)):
            print(f"\nfederation with {strategy}: 3 nodes, each training on its own shard "
                  f"({', '.join(SHARDS)}), {rounds} rounds")
            histories[strategy] = asyncio.run(run_federation(
                root, model, strategy, rounds, config, serve=serve and not compare))
        if compare:
            print("\nmean held-out loss per round:")
            print("  round  " + "  ".join(f"{s:>10}" for s in histories))
            for i in range(rounds):
                print(f"  {i + 1:>5}  " + "  ".join(f"{h[i].mean_eval_loss:>10.3f}"
                                                    for h in histories.values()))
            out = Path(plot or (Path(workdir) / "demo-loss.png" if workdir else "demo-loss.png"))
            if plot_history(histories, out, "chorus-p2p demo: 3 nodes, non-IID shards"):
                print(f"plot: {out}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s")
    return histories
