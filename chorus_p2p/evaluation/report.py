"""Reports from run records: mean ± 95% CI per strategy, paired differences, wins per seed.

Runs are paired by seed (the same seed is the same data, partition and initial adapter for
every strategy of a setting), so a strategy's difference from ``fedavg`` or from ``local`` is
taken seed by seed and its CI is the paired one: seed noise as large as the published margins
cancels instead of hiding them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from chorus_p2p.evaluation.runner import primary_metric

# Student's t, two-sided 95% (0.975 quantile), by degrees of freedom; larger df: 1.96.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000}


def t_quantile(df: int) -> float:
    if df in T_975:
        return T_975[df]
    below = [d for d in T_975 if d < df]
    return T_975[max(below)] if df <= 60 else 1.96  # conservative between table rows


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (nan for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def _fmt(mean: float, half: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per setting: each strategy's figures over seeds, and paired comparisons."""
    by_setting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        run = record["run"]
        key = json.dumps({k: v for k, v in run.items() if k not in ("strategy", "seed")},
                         sort_keys=True)
        by_setting[key].append(record)
    out = []
    for key, rows in by_setting.items():
        kind = rows[0]["task_kind"]
        name, higher = primary_metric(kind)
        table: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in rows:
            table[r["run"]["strategy"]][r["run"]["seed"]] = r
        strategies = {}
        for strategy, seeds in table.items():
            def values(path: tuple[str, ...]) -> list[float]:
                got = []
                for r in seeds.values():
                    node: Any = r["final"]
                    for step in path:
                        node = node[step]
                    got.append(float(node))
                return got
            entry = {"seeds": sorted(seeds),
                     "global": mean_ci(values(("global", "mean", name))),
                     "global_loss": mean_ci(values(("global", "mean", "loss"))),
                     "worst_client": mean_ci(values(("global", "worst", name))),
                     "personal": mean_ci(values(("personal", "mean", name))),
                     "personal_worst": mean_ci(values(("personal", "worst", name))),
                     "bytes_per_client_round": statistics.fmean(
                         r["cost"]["bytes_per_client_round"] for r in seeds.values()),
                     # (run records written before downloads were measured have none)
                     "bytes_down_per_client_round": _mean_or_none(
                         r["cost"].get("bytes_down_per_client_round") for r in seeds.values()),
                     "seconds_per_round": statistics.fmean(
                         r["cost"]["seconds_per_round"] for r in seeds.values())}
            for against in ("fedavg", "local"):
                if against in table and against != strategy:
                    paired = [float(seeds[s]["final"]["global"]["mean"][name]) -
                              float(table[against][s]["final"]["global"]["mean"][name])
                              for s in sorted(seeds) if s in table[against]]
                    if paired:
                        better = sum((d > 0) if higher else (d < 0) for d in paired)
                        entry[f"vs_{against}"] = {"diff": mean_ci(paired), "wins": better,
                                                  "pairs": len(paired)}
            strategies[strategy] = entry
        dp = next((r.get("dp") for r in rows if r.get("dp")), None)
        out.append({"setting": json.loads(key), "task_kind": kind, "metric": name, "dp": dp,
                    "higher_is_better": higher, "label_skew": statistics.fmean(
                        r["label_skew"] for r in rows), "strategies": strategies})
    return out


ORDER = ("local", "fedavg", "fedex", "fedex-svd", "centralized")


def _mean_or_none(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(summary: list[dict[str, Any]], title: str) -> str:
    lines = [f"# {title}", ""]
    for block in summary:
        s = block["setting"]
        metric = block["metric"]
        lines += [f"## {s['task']}: {s['clients']} clients, {s['partition']}"
                  f"{' alpha ' + str(s['dirichlet_alpha']) if s['partition'] == 'dirichlet' else ''}"
                  f", rank {s['rank']}, {s['rounds']} rounds x {s['local_steps']} steps"
                  + (f", {_dp_kind(block['dp'])} z={block['dp']['noise_multiplier']:g} C="
                     f"{block['dp']['clip']:g}: epsilon {block['dp']['epsilon']:.2f} at delta "
                     f"{block['dp']['delta']:g} (federated strategies; the bounds send nothing)"
                     if block.get("dp") else ""),
                  "",
                  f"Label skew {block['label_skew']:.3f} (mean total variation from the pooled "
                  f"labels). Global {metric} on the shared held-out set, mean ± 95% CI over "
                  f"seeds ({'higher' if block['higher_is_better'] else 'lower'} is better); "
                  "for `local`, the mean client and the worst client. Paired differences are "
                  "per seed; wins count the seeds where the strategy is better.",
                  "",
                  f"| strategy | global {metric} | worst client | personal (own split) | "
                  "loss | vs fedavg (wins) | vs local (wins) | bytes up / down per client "
                  "per round |",
                  "|---|---|---|---|---|---|---|---|"]
        entries = block["strategies"]
        for strategy in [x for x in ORDER if x in entries] + \
                [x for x in entries if x not in ORDER]:
            e = entries[strategy]

            def versus(key: str) -> str:
                if key not in e:
                    return "-"
                v = e[key]
                return f"{_fmt(*v['diff'])} ({v['wins']}/{v['pairs']})"
            lines.append(
                f"| {strategy} | {_fmt(*e['global'])} | {_fmt(*e['worst_client'])} | "
                f"{_fmt(*e['personal'])} | {_fmt(*e['global_loss'])} | {versus('vs_fedavg')} | "
                f"{versus('vs_local')} | {e['bytes_per_client_round']:.0f} / "
                f"{_bytes(e.get('bytes_down_per_client_round'))} |")
        lines.append("")
    return "\n".join(lines)


def write_reports(out: Path, records: list[dict[str, Any]], title: str) -> tuple[Path, Path]:
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    (out / "summary.md").write_text(markdown(summary, title))
    return out / "summary.md", out / "summary.json"


def _dp_kind(dp: dict[str, Any]) -> str:
    """Runs recorded before DP-SGD existed were local DP."""
    return "DP-SGD (per record)" if dp.get("mechanism") == "dp-sgd" else "local DP"
