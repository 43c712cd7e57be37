"""The Jepsen-style checker, long: 5 nodes on a virtual LAN, faults for --minutes (default 30).

Same harness as ``tests/test_jepsen_netns.py`` (:mod:`chorus_p2p.chaos`): 3 clients submit
unique updates through the SDK while a seeded nemesis partitions the network (random splits,
the coordinator alone, bridges), kills -9 and restarts nodes (some with a clock 120 s off, inside
the allowed window) and flaps links every 1.5-4 s. Then everything heals and the checker
prints the counts: operations, faults, acknowledged, lost (must be 0), counted twice,
committed rounds that changed (must be 0), whether every node holds the same history and a
byte-identical state, and whether the federation still commits.

Needs root (network namespaces); nothing touches the host's interfaces.

Usage::

    sudo .venv/bin/python benchmarks/chaos.py                 # 30 minutes, seed 1
    sudo .venv/bin/python benchmarks/chaos.py --minutes 5 --seed 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from chorus_p2p.chaos import Chaos
from chorus_p2p.netlab import NetLab, namespaces_unavailable
from chorus_p2p.trust.identity import copy_admin_key, init_data_dir
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.tiny import quiet_transformers, save_tiny_model, write_random_update

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")
NODE_ARGS = ["--rank", str(RANK), "--alpha", str(ALPHA), "--target-modules", ",".join(TARGETS),
             "--election-timeout", "0.5", "--min-updates", "2", "--round-deadline", "4",
             "--keep-rounds", "5", "--checkpoint-every", "5"]


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so the virtual LAN is torn down whatever stops us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=5)
    args = parser.parse_args()
    why = namespaces_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    quiet_transformers()
    print(f"chaos: {args.nodes} nodes, {args.minutes:g} min of faults, seed {args.seed}; "
          f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="chorus-chaos-") as tmp:
        root = Path(tmp)
        model = save_tiny_model(root / "model", seed=0)
        spec = FederationSpec.build(str(model), RANK, ALPHA, TARGETS)
        first = init_data_dir(root / "d0", "chaos")
        for i in range(1, args.nodes):  # the checker acts as admin from whichever node leads
            init_data_dir(root / f"d{i}", join_token=first.join_token())
            copy_admin_key(root / "d0", root / f"d{i}")
        started = time.monotonic()
        with NetLab(args.nodes) as lab:
            chaos = Chaos(lab, [root / f"d{i}" for i in range(args.nodes)], model, NODE_ARGS,
                          first.secret, lambda path, s: write_random_update(path, spec, s),
                          seed=args.seed)
            try:
                report = asyncio.run(chaos.run(args.minutes * 60))
            except AssertionError as exc:
                report = None
                failure = f"FAIL: {exc}"
            if report is None or not report.ok:
                # keep what a post-mortem needs: every node's data dir and log, and the ops
                if report is None:
                    print(failure, file=sys.stderr)
                chaos.save_logs()
                kept = Path(tempfile.mkdtemp(prefix="chorus-chaos-failed-"))
                try:  # the nodes still run: a blob collected mid-copy is not worth the post-mortem
                    shutil.copytree(root, kept, dirs_exist_ok=True)
                except shutil.Error as exc:
                    print(f"(copied with {len(exc.args[0])} file(s) gone mid-copy)",
                          file=sys.stderr)
                if report is None:
                    print(f"{failure}\nnode data dirs and logs kept in {kept}", file=sys.stderr)
                    return 1
                lost = [vars(op) for op in report.lost + report.duplicated
                        + report.refused_but_counted]
                (kept / "violations.json").write_text(json.dumps(lost, indent=1, default=str))
                print(f"violations ({len(lost)}) and node data dirs kept in {kept}")
        print(f"finished in {(time.monotonic() - started) / 60:.1f} min")
    r = report
    print(f"  operations            {r.operations}")
    print(f"  faults                {sum(r.faults.values())} ("
          + ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items())) + ")")
    print(f"  acknowledged          {r.acknowledged}")
    print(f"  refused (definite)    {r.refused}")
    print(f"  unknown outcome       {r.unknown}")
    print(f"  committed rounds      {r.committed_rounds}")
    print(f"  LOST acknowledged     {len(r.lost)}   (must be 0)")
    print(f"  counted twice         {len(r.duplicated)}   (must be 0)")
    print(f"  refused but counted   {len(r.refused_but_counted)}   (must be 0)")
    print(f"  committed rounds that changed  {len(r.changed_rounds)}   (must be 0)")
    print(f"  same history everywhere {r.histories_agree}; byte-identical state "
          f"{r.states_agree}; commits after healing {r.new_round_after_healing}")
    if r.liveness_detail:
        print(f"  why no commit after healing: {r.liveness_detail}")
    print("verdict: " + ("PASS" if r.ok else "FAIL"))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
