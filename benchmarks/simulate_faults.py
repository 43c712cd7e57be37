"""The election core under seeded fault schedules, for --minutes (default 1), on every core.

Each schedule runs 3-5 election cores (the same code the node runs) over a simulated network,
clock and disk, with message loss, duplication, delay and reordering, one-way and two-way
partitions, crashes (some right after an answer), restarts, clock drift and jumps, and stalled
event loops; then faults stop and one coordinator must emerge. Safety is checked after every
step. Prints schedules and events per second, and any violation with its seed.

Usage::

    .venv/bin/python benchmarks/simulate_faults.py --minutes 5
    .venv/bin/python benchmarks/simulate_faults.py --seed 1899 --trace   # replay one schedule
    .venv/bin/python benchmarks/simulate_faults.py --mutant unpersisted_vote --minutes 1
    # how many schedules, searched in order, the simulator needs to find a bug brought back
    .venv/bin/python benchmarks/simulate_faults.py --mutant unpersisted_vote --clients 0 \
        --minutes 5 --stop-at-first
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

from chorus_p2p.consensus import mutants
from chorus_p2p.consensus.simulation import Simulation, explore

BATCH = 200


def _batch(args: tuple[int, tuple[str, ...], dict]) -> tuple[int, int, list[str]]:
    first, switched_on, kwargs = args
    mutants.MUTANTS.clear()
    mutants.MUTANTS.update(switched_on)
    return explore(range(first, first + BATCH), **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, help="replay this one schedule")
    parser.add_argument("--trace", action="store_true", help="with --seed: print every step")
    parser.add_argument("--mutant", action="append", default=[],
                        choices=mutants.KNOWN,
                        help="bring back a protocol bug (to see the simulator find it)")
    parser.add_argument("--clients", type=int, default=None,
                        help="clients per schedule (0: elections only, more of them per event)")
    parser.add_argument("--stop-at-first", action="store_true",
                        help="stop at the first violation, searching seeds in order, and say "
                             "after how many schedules it came")
    args = parser.parse_args()
    kwargs = {} if args.clients is None else {"clients": args.clients}
    if args.seed is not None:
        mutants.MUTANTS.update(args.mutant)
        outcome = Simulation(args.seed, keep_trace=args.trace, **kwargs).run()
        if args.trace:
            print("\n".join(outcome.trace))
        print(f"seed {args.seed}: {outcome.events} events, {outcome.terms} terms, "
              f"trace {outcome.digest[:16]}")
        print("\n".join(outcome.violations) or "no violation")
        return 1 if outcome.violations else 0
    deadline = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    schedules = events = 0
    violations: list[str] = []
    next_seed = args.first_seed
    with multiprocessing.Pool(args.workers) as pool:
        pending = []
        while time.monotonic() < deadline or pending:
            while time.monotonic() < deadline and len(pending) < 2 * args.workers:
                pending.append(pool.apply_async(_batch, ((next_seed, tuple(args.mutant),
                                                          kwargs),)))
                next_seed += BATCH
            done = pending.pop(0).get()
            schedules += done[0]
            events += done[1]
            violations += done[2]
            if args.stop_at_first and violations:
                # batches finish in seed order here, so this is the lowest violating seed
                first = int(violations[0].split()[1])
                print(f"first violation after {first - args.first_seed + 1} schedules "
                      f"(seed {first}), {time.monotonic() - started:.1f} s")
                pool.terminate()
                next_seed = args.first_seed + schedules
                break
    elapsed = time.monotonic() - started
    load = os.getloadavg()[0]
    print(f"{schedules} schedules (seeds {args.first_seed}-{next_seed - 1}), {events} events "
          f"in {elapsed:.1f} s on {args.workers} workers (load {load:.1f}): "
          f"{schedules / elapsed:.0f} schedules/s, {events / elapsed:.0f} events/s, "
          f"{events / max(schedules, 1):.0f} events per schedule")
    print(f"violations: {len(violations)}")
    for line in violations[:20]:
        print("  " + line)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
