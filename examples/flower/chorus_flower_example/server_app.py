"""ServerApp: ExactLoRA for ``num-server-rounds`` rounds, evaluating the exact global model."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from chorus_flower_example.settings import targets, workdir
from chorus_p2p.demos.federation import ensure_tiny_model, shard_paths
from chorus_p2p.flower import ExactLoRA
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.train.data import Dataset
from chorus_p2p.train.trainer import TrainConfig

app = ServerApp()


def _dp_policy(config):
    """``dp-epsilon > 0``: clients release private updates (``dp-mechanism``: local DP or
    record-level DP-SGD), and the server refuses any reply that does not (the policy a node
    federation sets with ``init --require-dp``)."""
    if float(config.get("dp-epsilon", 0.0)) <= 0:
        return None
    from chorus_p2p.federation.dp_policy import DPPolicy

    return DPPolicy(max_epsilon=float(config["dp-epsilon"]),
                    min_noise=float(config.get("dp-noise", 1.0)),
                    mechanism=str(config.get("dp-mechanism", "gaussian-local")))


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    root = workdir(config)
    model = str(config.get("model") or ensure_tiny_model(root))
    rank, alpha = int(config.get("rank", 8)), float(config.get("alpha", 16.0))
    spec = FederationSpec.build(model, rank, alpha, targets(config))
    clients = int(config.get("clients", 3))
    strategy = ExactLoRA(spec, root / f"server-run-{context.run_id}",
                         aggregation=str(config.get("aggregation", "fedex")),
                         min_train_nodes=clients, min_evaluate_nodes=clients,
                         min_available_nodes=clients,
                         keep_updates=bool(config.get("keep-updates", False)),
                         checkpoint_every=int(config.get("checkpoint-every", 1)),
                         dp_policy=_dp_policy(config))
    train_config = ConfigRecord({
        "model": model, "rank": rank, "alpha": alpha, "target-modules": ",".join(spec.target_modules),
        "steps": int(config.get("steps", 8)), "lr": float(config.get("lr", 1e-3)),
        "batch-size": int(config.get("batch-size", 8)), "workdir": str(root),
        "dp-epsilon": float(config.get("dp-epsilon", 0.0)),
        "dp-clip": float(config.get("dp-clip", 1.0)), "dp-noise": float(config.get("dp-noise", 1.0)),
        "dp-mechanism": str(config.get("dp-mechanism", "gaussian-local"))})
    held_out = [Dataset.load(p) for p in shard_paths()]
    result = strategy.start(
        grid=grid, initial_arrays=strategy.initial_arrays(
            f"flower-{context.run_id}", str(config.get("initial-adapter") or "") or None),
        num_rounds=int(config.get("num-server-rounds", 3)), train_config=train_config,
        evaluate_config=ConfigRecord(dict(train_config)),
        evaluate_fn=strategy.evaluate_fn(model, held_out, TrainConfig()))
    summary = {"run_id": context.run_id, "workdir": str(strategy.workdir),
               "global_adapter": str(strategy.global_adapter_dir),
               "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
               "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
               "server_evaluate": {r: dict(m) for r, m in
                                   result.evaluate_metrics_serverapp.items()}}
    (strategy.workdir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"chorus: exact global model in {strategy.workdir} (adapter "
          f"{strategy.global_adapter_dir}, R in {strategy.workdir / 'state'})", flush=True)
