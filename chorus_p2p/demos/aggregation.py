"""``chorus-node demo``: exact aggregation on the built-in tiny model, end to end, offline.

Builds a tiny Llama, makes client adapters with different ranks, alphas and example counts,
aggregates them with every strategy, folds each residual into a copy of the base, and measures
through PEFT how far ``base + R + adapter`` is from the exact weighted mean of the clients.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from chorus_p2p.exactness import check_exactness
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.fold import fold_base
from chorus_p2p.lora.residual import RESIDUAL_FILE
from chorus_p2p.lora.strategies import STRATEGIES
from chorus_p2p.tiny import make_client_adapter, quiet_transformers, save_tiny_model


def _run(workdir: Path, clients: int, seed: int) -> list[dict]:
    print(f"building a tiny Llama and {clients} client adapters in {workdir}")
    base = save_tiny_model(workdir / "base", seed=seed)
    client_dirs, weights = [], []
    for i in range(clients):
        rank = (4, 8, 2)[i % 3]
        client_dirs.append(make_client_adapter(base, workdir / f"client{i}", seed=seed + 100 + i,
                                               rank=rank, alpha=2.0 * rank if i % 2 else 16.0))
        weights.append(float(50 + 40 * i))
        print(f"  client{i}: rank {rank}, {int(weights[-1])} examples")
    print(f"\n{'strategy':<10} {'aggregate':>10} {'residual':>9} {'max rel err':>12} "
          f"{'logits err':>11}  exact?")
    results = []
    for strategy in STRATEGIES:
        out = workdir / f"global-{strategy}"
        started = time.perf_counter()
        report = aggregate_adapters([str(d) for d in client_dirs], out, strategy=strategy,
                                    weights=weights, rank=8 if strategy == "fedex-svd" else None)
        elapsed = time.perf_counter() - started
        folded = base
        if (out / RESIDUAL_FILE).exists():
            folded = workdir / f"base+R-{strategy}"
            fold_base(base, out / RESIDUAL_FILE, folded)
        check = check_exactness(base, client_dirs, weights, folded, out, seed=seed)
        exact = check.max_relative_error <= 1e-5
        energy = "-" if strategy == "fedavg" else f"{report.residual_energy:.3f}"
        print(f"{strategy:<10} {elapsed * 1000:>8.1f}ms {energy:>9} "
              f"{check.max_relative_error:>12.2e} {check.logits_relative_error:>11.2e}  "
              f"{'yes' if exact else 'no'}")
        results.append({"strategy": strategy, "aggregate_ms": round(elapsed * 1000, 3),
                        "residual_energy": None if strategy == "fedavg" else
                        report.residual_energy, "max_relative_error": check.max_relative_error,
                        "logits_relative_error": check.logits_relative_error, "exact": exact})
    print("\nexact strategies reproduce the weighted mean of the clients' merged weights to float32 "
          "round-off;\nfedavg (averaging A and B separately) does not.")
    return results


def run_aggregation_demo(clients: int = 4, workdir: str | None = None, seed: int = 0
                         ) -> list[dict]:
    """Per strategy: time, residual energy, and the measured errors through PEFT."""
    quiet_transformers()
    if workdir:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return _run(path, clients, seed)
    with tempfile.TemporaryDirectory(prefix="chorus-demo-") as tmp:
        return _run(Path(tmp), clients, seed)
