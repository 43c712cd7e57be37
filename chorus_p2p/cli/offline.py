"""Sub-commands that need no running node: ``aggregate``, ``fold`` and ``demo``.

These are the scripted building blocks (CI, shell scripts, our own checks) and keep stable names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from chorus_p2p.cli.output import human_output, print_json
from chorus_p2p.cli.progress import progress_bar
from chorus_p2p.cli.types import positive_int
from chorus_p2p.errors import UsageError
from chorus_p2p.lora.names import DEFAULT_STRATEGY, STRATEGIES


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--weights {text!r}: give comma-separated numbers, e.g. 120,80,200")
    if not weights:
        raise UsageError("--weights is empty")
    return weights


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from chorus_p2p.lora.aggregate import aggregate_adapters

    weights = parse_weights(args.weights) if args.weights else None
    with progress_bar("aggregating", "modules") as bar:
        report = aggregate_adapters(args.adapters, args.out, strategy=args.strategy,
                                    weights=weights, rank=args.rank, force=args.force,
                                    progress=bar)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        energy = report.residual_energy
        print(f"{report.strategy}: {len(report.clients)} adapters, {len(report.modules)} modules, "
              f"{report.seconds * 1000:.1f} ms, residual energy "
              f"{'n/a' if report.strategy == 'fedavg' or math.isnan(energy) else f'{energy:.4f}'}"
              f" -> {args.out}")
    return 0


def _cmd_fold(args: argparse.Namespace) -> int:
    from chorus_p2p.lora.fold import fold_base

    with progress_bar("folding", "modules") as bar:
        changed = fold_base(args.base, args.residual, args.out, force=args.force, progress=bar)
    if args.json:
        print(json.dumps({"out": str(args.out), "folded": sorted(changed)}, indent=2))
    else:
        print(f"folded residual into {len(changed)} weights -> {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.exactness:
        from chorus_p2p.demos.aggregation import run_aggregation_demo

        with human_output(args.json):
            results = run_aggregation_demo(clients=args.clients, workdir=args.workdir,
                                           seed=args.seed)
        if args.json:
            print_json({"exactness": results})
        # fedavg is the inexact baseline; an exact strategy that is not exact is a failure
        return 0 if all(r["exact"] for r in results if r["strategy"] != "fedavg") else 3
    from chorus_p2p.demos.federation import run_federation_demo

    with human_output(args.json):
        histories = run_federation_demo(rounds=args.rounds, compare=args.compare,
                                        workdir=args.workdir, steps=args.steps, lr=args.lr,
                                        plot=args.plot, serve=args.serve)
    if args.json:
        print_json({strategy: [{**dataclasses.asdict(r), "mean_eval_loss": r.mean_eval_loss}
                               for r in rounds] for strategy, rounds in histories.items()})
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    agg = commands.add_parser(
        "aggregate", help="aggregate client adapters into a global adapter + residual",
        description="Aggregate PEFT LoRA adapters (folders or .safetensors files). Writes "
                    "OUT/adapter_config.json, OUT/adapter_model.safetensors, "
                    "OUT/residual.safetensors (exact strategies) and OUT/aggregation.json.")
    agg.add_argument("adapters", nargs="+", metavar="ADAPTER",
                     help="client adapters: PEFT folders or .safetensors files")
    agg.add_argument("--out", required=True, metavar="OUT_DIR", help="the folder to write")
    agg.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                     help=f"default {DEFAULT_STRATEGY}")
    agg.add_argument("--weights", metavar="W1,W2,...",
                     help="client weights, e.g. example counts (default: equal)")
    agg.add_argument("--rank", type=positive_int, help="output rank (fedex-svd only; default: widest client)")
    agg.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    agg.add_argument("--json", action="store_true", help="print the aggregation report as JSON")
    agg.set_defaults(handler=_cmd_aggregate)

    fold = commands.add_parser(
        "fold", help="fold a residual into base weights",
        description="Write OUT: a copy of the base model folder (or single .safetensors file) "
                    "with the residual added to each targeted weight, in float32.")
    fold.add_argument("--base", required=True, metavar="MODEL_DIR_OR_SAFETENSORS",
                      help="the base model folder or one .safetensors file")
    fold.add_argument("--residual", required=True, metavar="FILE",
                      help="a round's residual.safetensors (aggregate, pull --residual) or a "
                      "node's dense R (cumulative.safetensors from pull --cumulative)")
    fold.add_argument("--out", required=True, metavar="OUT", help="where the folded copy goes")
    fold.add_argument("--force", action="store_true", help="replace OUT if it exists")
    fold.add_argument("--json", action="store_true", help="machine-readable output")
    fold.set_defaults(handler=_cmd_fold)

    demo = commands.add_parser(
        "demo", help="run a 3-node federation on the built-in tiny model (offline)",
        description="Start 3 nodes on loopback, each training the tiny Llama on its own shard of "
                    "examples/data for --rounds rounds, and print the global model's held-out "
                    "loss per shard, aggregation time and residual energy per round. "
                    "--exactness instead checks the exactness identity through PEFT on "
                    "generated adapters for every strategy.")
    demo.add_argument("--rounds", type=positive_int, default=5, help="rounds (default 5)")
    demo.add_argument("--compare", action="store_true",
                      help="also run fedavg and plot eval loss per round for both (PNG)")
    demo.add_argument("--plot", metavar="PNG", help="where --compare writes its plot")
    demo.add_argument("--steps", type=positive_int, default=30, help="training steps per node per round")
    demo.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    demo.add_argument("--serve", action="store_true",
                      help="keep the federation training after the rounds, for `chorus-node tui` "
                           "(Ctrl-C stops it)")
    demo.add_argument("--exactness", action="store_true",
                      help="the aggregation-exactness demo instead of the federation")
    demo.add_argument("--clients", type=positive_int, default=4, help="(--exactness) client adapters")
    demo.add_argument("--seed", type=int, default=0, help="(--exactness) random seed")
    demo.add_argument("--workdir", help="keep the generated files here (default: a temp dir)")
    demo.add_argument("--json", action="store_true",
                      help="print the results as one JSON document (progress goes to stderr)")
    demo.set_defaults(handler=_cmd_demo)
