"""PNG curves of an experiment (the ``plots`` extra): per setting, each strategy's primary
metric on the shared held-out set after every round, the mean over seeds with the seeds' range
shaded. The Markdown table says where runs ended; the curves say how they got there (a strategy
still climbing at the last round, or one that peaked early).

Drawn from the run JSONs alone, like the Markdown, so ``eval --report`` re-renders them too.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from chorus_p2p.evaluation.report import ORDER, summarize


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def curves(records: list[dict[str, Any]], setting: dict[str, Any], metric: str
           ) -> dict[str, list[tuple[int, float, float, float]]]:
    """Per strategy: (round, mean, lowest, highest) of ``metric`` over the setting's seeds."""
    per_round: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        run = {k: v for k, v in record["run"].items() if k not in ("strategy", "seed")}
        if run != setting:
            continue
        for point in record["curve"]:
            if metric in point:
                per_round[record["run"]["strategy"]][point["round"]].append(float(point[metric]))
    return {strategy: [(n, statistics.fmean(v), min(v), max(v)) for n, v in sorted(rounds.items())]
            for strategy, rounds in per_round.items()}


def write_plots(out: Path, records: list[dict[str, Any]]) -> list[Path]:
    """One ``curves-K.png`` per setting (K as in summary.json's order); none without
    matplotlib (the caller says how to get it)."""
    if not have_matplotlib():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for index, block in enumerate(summarize(records), start=1):
        metric, s = block["metric"], block["setting"]
        lines = curves(records, s, metric)
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for strategy in [x for x in ORDER if x in lines] + [x for x in lines if x not in ORDER]:
            points = lines[strategy]
            rounds = [p[0] for p in points]
            ax.plot(rounds, [p[1] for p in points], marker="o", label=strategy)
            ax.fill_between(rounds, [p[2] for p in points], [p[3] for p in points], alpha=0.15)
        ax.set_xlabel("round")
        ax.set_ylabel(f"global {metric} (held-out)")
        dp = block.get("dp")
        private = (f", {dp.get('mechanism', 'gaussian-local')} z={dp['noise_multiplier']:g} "
                   f"eps={dp['epsilon']:.3g}" if dp else "")
        ax.set_title(f"{s['task']}: {s['clients']} clients, {s['partition']}, rank {s['rank']}"
                     f"{private} (mean over "
                     f"{len(next(iter(block['strategies'].values()))['seeds'])} seeds; range "
                     "shaded)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves-{index}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    (out / "curves.json").write_text(json.dumps(
        [{"png": p.name, "setting": b["setting"], "metric": b["metric"]}
         for p, b in zip(written, summarize(records))], indent=1, sort_keys=True))
    return written
