"""``chorus-node eval``: run an experiment file, or check it, or re-render its reports."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chorus_p2p.cli.output import print_json


def _cmd_eval(args: argparse.Namespace) -> int:
    from chorus_p2p.evaluation.experiment import Experiment
    from chorus_p2p.evaluation.plots import write_plots
    from chorus_p2p.evaluation.report import write_reports
    from chorus_p2p.evaluation.runner import check, load_records, run_experiment
    from chorus_p2p.tiny import quiet_transformers

    quiet_transformers()
    experiment = Experiment.load(args.config)
    out = Path(args.out or f"eval-{experiment.name}")
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else \
        (lambda m: print(m, flush=True))
    if args.check:
        lines = check(experiment)
        if args.json:
            print_json({"experiment": experiment.name, "runs": len(experiment.runs()),
                        "ok": True, "lines": lines})
        else:
            print("\n".join(lines))
            print("ok: the experiment and its data are ready (nothing was trained)")
        return 0
    if args.report:
        records = load_records(out)
        if not records:
            print(f"chorus-node: error: {out}/runs holds no run records", file=sys.stderr)
            return 3
    else:
        records = run_experiment(experiment, out, log)
    md, summary = write_reports(out, records, f"chorus-node eval: {experiment.name}")
    pngs = write_plots(out, records)
    curves = (f"curves: {', '.join(str(p) for p in pngs)}" if pngs else
              "(no PNG curves: matplotlib is not installed; pip install 'chorus-p2p[plots]')")
    if args.json:
        print(json.dumps(json.loads(summary.read_text()), indent=1))
        print(curves, file=sys.stderr)
    else:
        print(md.read_text())
        print(f"reports: {md} and {summary}; one JSON per run in {out}/runs")
        print(curves)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser(
        "eval", help="run an experiment: strategies against local-only and centralized, "
        "over seeds", description="Run every run of an experiment file (a TOML [experiment] "
        "table; any setting given as a list is swept), in-process through the node's own "
        "training and aggregation, and write per-run JSON plus a Markdown summary with 95% "
        "confidence intervals and paired differences. Reruns skip finished runs.")
    ev.add_argument("config", help="the experiment file (TOML)")
    ev.add_argument("--out", help="results folder (default ./eval-NAME)")
    ev.add_argument("--check", action="store_true",
                    help="validate the file, its data and partitions; train nothing")
    ev.add_argument("--report", action="store_true",
                    help="only re-render the reports from the run JSONs in --out")
    ev.add_argument("--json", action="store_true", help="print the summary as JSON")
    ev.set_defaults(handler=_cmd_eval)
