"""P2P timings on a virtual LAN (network namespaces + bridge, real mDNS), 5 nodes, tiny model.

Measures, over ``--repeats`` trials each:

- admission: a new node's ``listening`` log line -> every peer lists it as a live member;
- failover: ``kill -9`` of the coordinator -> one new coordinator that every survivor follows;
- result everywhere: the coordinator's ``round_committed`` -> the last node's ``round_committed``
  (both from the nodes' own headless logs, same machine clock).

Needs root (namespaces); prints why and exits 0 otherwise. Run: ``sudo python benchmarks/p2p.py``.
Targets (5 nodes): admission < 2 s, failover < 3 s, result everywhere < 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from chorus_p2p.client import NodeClient
from chorus_p2p.netlab import NetLab, NodeProc, namespaces_unavailable, wait_until
from chorus_p2p.trust.identity import init_data_dir
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.tiny import quiet_transformers, save_tiny_model, write_random_update

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")
ARGS = ["--rank", str(RANK), "--alpha", str(ALPHA), "--target-modules", ",".join(TARGETS),
        "--min-updates", "2"]


def write_update(path: Path, spec: FederationSpec, seed: int) -> Path:
    return write_random_update(path, spec, seed)


def status(proc: NodeProc, secret: bytes) -> dict:
    with NodeClient(proc.url, secret=secret, client_id="bench", timeout=5) as c:
        return c.status()


def members(proc: NodeProc, secret: bytes) -> list[dict]:
    with NodeClient(proc.url, secret=secret, client_id="bench", timeout=5) as c:
        return c.members()


def leader_of(procs: list[NodeProc], secret: bytes, size: int) -> NodeProc | None:
    st = {p.index: status(p, secret) for p in procs}
    leaders = [i for i, s in st.items() if s["role"] == "coordinator"]
    if len(leaders) != 1:
        return None
    lid = st[leaders[0]]["node_id"]
    if all(s["coordinator"] == lid and s["voting_members"] == size for s in st.values()):
        return next(p for p in procs if p.index == leaders[0])
    return None


def log_ts(proc: NodeProc, event: str, round_no: int | None = None) -> float | None:
    for e in proc.saw(event):
        if round_no is None or e.get("round") == round_no:
            return float(e["ts"])
    return None


def trial(workdir: Path, model: Path, spec: FederationSpec, nodes: int, election: float
          ) -> dict[str, float]:
    first = init_data_dir(workdir / "d0", "bench")
    for i in range(1, nodes):
        init_data_dir(workdir / f"d{i}", join_token=first.join_token())
    secret = first.secret
    args = ARGS + ["--election-timeout", str(election)]
    with NetLab(nodes - 1) as lab:
        procs = [lab.start(i, workdir / f"d{i}", model, args) for i in range(nodes - 1)]
        wait_until(lambda: leader_of(procs, secret, nodes - 1), 60, "first coordinator")

        # admission of the last node
        lab.add_host(nodes - 1)
        newcomer = lab.start(nodes - 1, workdir / f"d{nodes - 1}", model, args)
        started = wait_until(lambda: log_ts(newcomer, "listening"), 60, "newcomer listening")
        new_id = newcomer.saw("listening")[0]["data"]["node_id"]

        def admitted() -> bool:
            return all(any(m["node_id"] == new_id and m["status"] == "live"
                           for m in members(p, secret)) for p in procs)
        wait_until(admitted, 30, "admission", interval=0.02)
        admission = time.time() - started
        procs.append(newcomer)
        leader = wait_until(lambda: leader_of(procs, secret, nodes), 30, "stable leader")

        # result everywhere
        for k, cid in enumerate(("alice", "bob")):
            with NodeClient(leader.url, secret=secret, client_id=cid, timeout=10) as c:
                c.submit(write_update(workdir / f"{cid}.safetensors", spec, k), examples=1)
        wait_until(lambda: all(log_ts(p, "round_committed", 1) for p in procs), 30,
                   "round 1 everywhere")
        committed = log_ts(leader, "round_committed", 1)
        everywhere = max(log_ts(p, "round_committed", 1) for p in procs) - committed

        # failover
        survivors = [p for p in procs if p is not leader]
        killed_at = time.time()
        leader.kill9()
        wait_until(lambda: leader_of(survivors, secret, nodes), 30, "failover", interval=0.02)
        failover = time.time() - killed_at
    return {"admission": admission, "failover": failover, "everywhere": everywhere}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--election-timeout", type=float, default=1.0,
                        help="as `chorus-node up --election-timeout` (default 1.0, its default)")
    args = parser.parse_args()
    reason = namespaces_unavailable()
    if reason:
        print(f"p2p benchmark skipped: {reason}")
        return 0
    quiet_transformers()
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="chorus-p2p-bench-") as tmp:
        model = save_tiny_model(Path(tmp) / "tiny")
        spec = FederationSpec.build(str(model), RANK, ALPHA, TARGETS)
        for r in range(args.repeats):
            result = trial(Path(tmp) / f"t{r}", model, spec, args.nodes, args.election_timeout)
            results.append(result)
            print(f"trial {r + 1}: admission {result['admission']:.2f} s, failover "
                  f"{result['failover']:.2f} s, result everywhere {result['everywhere'] * 1000:.0f} ms")
    print(f"\n{args.nodes} nodes, election timeout {args.election_timeout} s, median of "
          f"{args.repeats} (2 cores, torch {torch.__version__}):")
    targets = {"admission": 2.0, "failover": 3.0, "everywhere": 1.0}
    for key, label in (("admission", "new node admitted by all peers"),
                       ("failover", "coordinator kill -9 -> new coordinator followed by all"),
                       ("everywhere", "round commit -> every node holds the result")):
        med = statistics.median(r[key] for r in results)
        worst = max(r[key] for r in results)
        verdict = "met" if med < targets[key] else "NOT met"
        print(f"  {label:<56} median {med:6.2f} s  max {worst:6.2f} s  target < "
              f"{targets[key]:.0f} s: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
