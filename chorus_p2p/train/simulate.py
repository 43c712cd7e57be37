"""In-process federated training: the same rounds a federation runs, without sockets.

Each round every client trains from the global state (``W0 + R + adapter``) on its own shard,
the adapters are aggregated with the chosen strategy exactly as a coordinator does, ``D`` is
folded into ``R``, and the global model is evaluated on every shard's held-out split.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from chorus_p2p.lora.adapter_io import write_adapter
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.residual import RESIDUAL_FILE
from chorus_p2p.state.store import StateStore
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.train.data import Dataset
from chorus_p2p.train.trainer import TrainConfig, TrainResult, eval_global, train_round

DEMO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RoundStats:
    round: int
    strategy: str
    eval_loss: dict[str, float]
    aggregation_ms: float
    residual_energy: float | None
    client_train_loss: list[float] = field(default_factory=list)

    @property
    def mean_eval_loss(self) -> float:
        return sum(self.eval_loss.values()) / len(self.eval_loss)


def initial_state(spec: FederationSpec, federation: str, out: Path) -> Path:
    """Round 0: the same deterministic PEFT init a node derives."""
    write_adapter(out, spec.adapter_config(), spec.initial_adapter(federation))
    return out


@dataclass
class RoundResult:
    """What one in-process round produced: the new global adapter, the state after it, each
    client's training result and the aggregation report."""

    number: int
    global_dir: Path
    state: StateStore
    clients: list[TrainResult]
    report: object


def run_rounds(model_path: str | Path, client_data: Sequence[Dataset], rounds: int,
               strategy: str, workdir: str | Path, spec: FederationSpec, config: TrainConfig,
               *, federation: str = "simulation", client_steps: Sequence[int] | None = None,
               after_round: Callable[[RoundResult], None] | None = None,
               release: Callable[[int, Path, TrainResult], TrainResult] | None = None) -> Path:
    """The rounds a federation runs, in this process: every client trains from ``W0 + R +
    adapter`` on its own data, the adapters are aggregated as a coordinator does, ``D`` is folded
    into the dense ``R`` a node keeps. ``simulate`` and ``chorus-node eval`` both run through
    here, so what they measure is the node's math. ``release(client, global_dir, result)``
    turns a trained adapter into what that client sends (local DP noises it). Returns the last
    global adapter."""
    workdir = Path(workdir)
    global_dir = initial_state(spec, federation, workdir / "round-0")
    state = StateStore(workdir / "state", spec.modules, checkpoint_every=rounds + 1,
                       transposed=spec.transposed)
    for number in range(1, rounds + 1):
        results = []
        for i, data in enumerate(client_data):
            steps = client_steps[i] if client_steps else config.steps
            cfg = TrainConfig(**{**asdict(config), "steps": steps,
                                 "seed": config.seed + 1000 * number + i})
            result = train_round(model_path, global_dir, state.read(number - 1), data, cfg,
                                 workdir / f"round-{number}" / f"client-{i}", progress=_silent)
            results.append(release(i, global_dir, result) if release else result)
        out = workdir / f"round-{number}" / "global"
        report = aggregate_adapters([str(r.adapter_dir) for r in results], out,
                                    strategy=strategy, weights=[r.examples for r in results],
                                    rank=spec.rank if strategy == "fedex-svd" else None)
        residual = out / RESIDUAL_FILE
        state.apply(number, residual if residual.exists() else None)
        global_dir = out
        if after_round is not None:
            after_round(RoundResult(number, out, state, results, report))
    return global_dir


def simulate(model_path: str | Path, client_data: Sequence[Dataset], eval_data: Sequence[Dataset],
             rounds: int, strategy: str, workdir: str | Path, *, rank: int = 8,
             alpha: float = 16.0, targets: Sequence[str] = DEMO_TARGETS,
             config: TrainConfig | None = None,
             on_round: Callable[[RoundStats], None] | None = None) -> list[RoundStats]:
    config = config or TrainConfig()
    workdir = Path(workdir)
    spec = FederationSpec.build(str(model_path), rank, alpha, tuple(targets))
    history: list[RoundStats] = []

    def evaluate(done: RoundResult) -> None:
        stats = RoundStats(done.number, strategy,
                           eval_global(model_path, done.global_dir, done.state.read(done.number),
                                       list(eval_data), config),
                           round(done.report.seconds * 1000, 2),
                           None if strategy == "fedavg" else done.report.residual_energy,
                           [r.train_loss for r in done.clients])
        history.append(stats)
        if on_round is not None:
            on_round(stats)

    run_rounds(model_path, client_data, rounds, strategy, workdir, spec, config,
               after_round=evaluate)
    (workdir / "history.json").write_text(json.dumps([asdict(h) for h in history], indent=2))
    return history


def _silent(step: int, loss: float) -> None:
    return None


def plot_history(histories: dict[str, list[RoundStats]], out: str | Path, title: str
                 ) -> Path | None:
    """Eval loss per round for each strategy (mean over shards, and per shard dotted); None
    (and a note) without matplotlib, which is the optional ``plots`` extra."""
    try:
        import matplotlib
    except ImportError:
        print("(no PNG: matplotlib is not installed; pip install 'chorus-p2p[plots]')")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for (strategy, history), color in zip(histories.items(), ("tab:blue", "tab:orange", "tab:green")):
        xs = [h.round for h in history]
        ax.plot(xs, [h.mean_eval_loss for h in history], marker="o", color=color,
                label=f"{strategy} (mean)")
        for shard in history[0].eval_loss:
            ax.plot(xs, [h.eval_loss[shard] for h in history], linestyle=":", color=color,
                    alpha=0.5)
    ax.set_xticks([h.round for h in next(iter(histories.values()))])
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (dotted: per shard)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def format_round(stats: RoundStats) -> str:
    shards = "  ".join(f"{k} {v:.3f}" for k, v in stats.eval_loss.items())
    energy = "-" if stats.residual_energy is None or math.isnan(stats.residual_energy) \
        else f"{stats.residual_energy:.3f}"
    return (f"round {stats.round}  eval loss: {shards}  (mean {stats.mean_eval_loss:.3f})  "
            f"aggregation {stats.aggregation_ms:.1f} ms  ||D||/||M|| {energy}")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    return fn(), time.perf_counter() - started
