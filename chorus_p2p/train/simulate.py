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
from chorus_p2p.node.spec import FederationSpec
from chorus_p2p.train.data import Dataset
from chorus_p2p.train.trainer import TrainConfig, eval_global, train_round

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


def simulate(model_path: str | Path, client_data: Sequence[Dataset], eval_data: Sequence[Dataset],
             rounds: int, strategy: str, workdir: str | Path, *, rank: int = 8,
             alpha: float = 16.0, targets: Sequence[str] = DEMO_TARGETS,
             config: TrainConfig | None = None,
             on_round: Callable[[RoundStats], None] | None = None) -> list[RoundStats]:
    config = config or TrainConfig()
    workdir = Path(workdir)
    spec = FederationSpec.build(str(model_path), rank, alpha, tuple(targets))
    global_dir = initial_state(spec, "simulation", workdir / "round-0")
    # The same state a node keeps: dense R, updated in place with each round's D.
    state = StateStore(workdir / "state", spec.modules, checkpoint_every=rounds + 1,
                       transposed=spec.transposed)
    history: list[RoundStats] = []
    for number in range(1, rounds + 1):
        client_dirs, weights, losses = [], [], []
        for i, data in enumerate(client_data):
            cfg = TrainConfig(**{**asdict(config), "seed": config.seed + 1000 * number + i})
            result = train_round(model_path, global_dir, state.read(number - 1), data, cfg,
                                 workdir / f"round-{number}" / f"client-{i}", progress=_silent)
            client_dirs.append(str(result.adapter_dir))
            weights.append(result.examples)
            losses.append(result.train_loss)
        out = workdir / f"round-{number}" / "global"
        report = aggregate_adapters(client_dirs, out, strategy=strategy, weights=weights,
                                    rank=rank if strategy == "fedex-svd" else None)
        residual = out / RESIDUAL_FILE
        state.apply(number, residual if residual.exists() else None)
        global_dir = out
        stats = RoundStats(number, strategy,
                           eval_global(model_path, global_dir, state.read(number), list(eval_data),
                                       config),
                           round(report.seconds * 1000, 2),
                           None if strategy == "fedavg" else report.residual_energy, losses)
        history.append(stats)
        if on_round is not None:
            on_round(stats)
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
