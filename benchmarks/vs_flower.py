"""Flower's FedAvg on LoRA arrays vs ExactLoRA inside Flower vs a chorus-p2p coordinator.

The same 10 clients with the same rank-16 adapters (random factors, different example counts)
on Llama-like attention shapes (``--hidden`` x ``--hidden`` q/o and a quarter of that for k/v,
``--layers`` layers), three aggregations in one run:

1. **Flower FedAvg** (``flwr.serverapp.strategy.FedAvg``): averages ``A`` and ``B`` separately
   (FedIT); the global model is ``W0 + s mean(B) mean(A)``.
2. **ExactLoRA in Flower** (``chorus_p2p.flower.ExactLoRA``, ``fedex``): the global adapter plus
   the residual ``D`` it folds into ``R``.
3. **chorus-p2p node**: ``aggregate_adapters`` on the uploads as stored, which is what a
   coordinator runs for a round (the same core as 2, without Flower's records).

Both strategies run through ``Strategy.start`` with a Flower ``Grid`` that answers in-process
with the prepared client replies (Flower's own messages and records, no network: the deployment
engine adds the same transport cost to both, and ``tests/test_flower.py`` runs a real one).

Printed per aggregation: the relative Frobenius error of the global model's change against the
float64 weighted mean of the clients' ``s B_k A_k`` (all modules together), the server's
aggregation time per round (median over ``--rounds``), and the bytes of arrays sent to each
client per round from round 2 on (the global adapter, plus ``D`` where the model needs it).

Usage::

    python benchmarks/vs_flower.py                 # 10 clients, hidden 2048, 4 layers
    python benchmarks/vs_flower.py --quick         # hidden 512, 2 layers
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from chorus_p2p.flower import ExactLoRA
from chorus_p2p.flower.inprocess import PreparedGrid
from chorus_p2p.flower.records import adapter_record
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.fold import iter_deltas
from chorus_p2p.lora.residual import RESIDUAL_FILE
from chorus_p2p.federation.spec import FederationSpec

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Timed:
    """Times ``aggregate_train`` of any strategy (the server's work per round)."""

    def __init__(self, strategy):
        self.strategy, self.seconds = strategy, []
        inner = strategy.aggregate_train

        def aggregate_train(server_round, replies):
            started = time.perf_counter()
            out = inner(server_round, replies)
            self.seconds.append(time.perf_counter() - started)
            return out
        strategy.aggregate_train = aggregate_train


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def client_adapters(spec: FederationSpec, clients: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    out = []
    for _ in range(clients):
        tensors = {}
        for prefix, (d_out, d_in) in spec.modules.items():
            tensors[f"{prefix}.lora_A.weight"] = 0.02 * torch.randn(spec.rank, d_in)
            tensors[f"{prefix}.lora_B.weight"] = 0.02 * torch.randn(d_out, spec.rank)
        out.append(tensors)
    return out


def relative_error(changes: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> float:
    num = sum(float((changes[p].double() - targets[p]).norm() ** 2) for p in targets)
    den = sum(float(targets[p].norm() ** 2) for p in targets)
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers = 512, 2
    work = Path(tempfile.mkdtemp(prefix="chorus-vs-flower-"))
    model = build_model(work / "model", args.hidden, args.layers)
    spec = FederationSpec.build(str(model), args.rank, 2.0 * args.rank, TARGETS)
    scale = spec.scale
    adapters = client_adapters(spec, args.clients)
    examples = [100 + 37 * i for i in range(args.clients)]
    weights = [e / sum(examples) for e in examples]
    target = {p: sum(w * scale * (a[f"{p}.lora_B.weight"].double() @ a[f"{p}.lora_A.weight"]
                                  .double()) for w, a in zip(weights, adapters))
              for p in spec.modules}
    replies = [RecordDict({"arrays": adapter_record(a), "metrics": MetricRecord(
        {"num-examples": e})}) for a, e in zip(adapters, examples)]
    initial = adapter_record(spec.initial_adapter("bench"))
    rows = []

    # 1. Flower's FedAvg on the LoRA arrays
    grid = PreparedGrid(args.clients, lambda i, message: replies[i])
    fedavg = FedAvg(fraction_evaluate=0.0, min_train_nodes=args.clients,
                    min_available_nodes=args.clients)
    timed = Timed(fedavg)
    result = fedavg.start(grid, initial, num_rounds=args.rounds)
    state = result.arrays.to_torch_state_dict()
    changes = {p: scale * (state[f"{p}.lora_B.weight"].double() @
                           state[f"{p}.lora_A.weight"].double()) for p in spec.modules}
    rows.append(("Flower FedAvg (A, B averaged)", relative_error(changes, target),
                 statistics.median(timed.seconds), grid.sent_bytes[-1]))

    # 2. ExactLoRA inside Flower: the adapter's product plus D equals the mean
    grid = PreparedGrid(args.clients, lambda i, message: replies[i])
    exact = ExactLoRA(spec, work / "exact", aggregation="fedex", fraction_evaluate=0.0,
                      min_train_nodes=args.clients, min_available_nodes=args.clients)
    timed = Timed(exact)
    result = exact.start(grid, exact.initial_arrays("bench"), num_rounds=args.rounds)
    state = result.arrays.to_torch_state_dict()
    delta = dict(iter_deltas(exact.deltas / f"round-{args.rounds}.safetensors"))
    changes = {p: scale * (state[f"{p}.lora_B.weight"].double() @
                           state[f"{p}.lora_A.weight"].double()) + delta[p].double()
               for p in spec.modules}
    rows.append(("ExactLoRA in Flower (fedex)", relative_error(changes, target),
                 statistics.median(timed.seconds), grid.sent_bytes[-1]))

    # 3. a chorus-p2p coordinator: the same core on the uploads as stored
    from chorus_p2p.flower.records import write_adapter_file

    paths = [str(write_adapter_file(r["arrays"], work / f"upload-{i}.safetensors"))
             for i, r in enumerate(replies)]
    seconds = []
    for number in range(args.rounds):
        out = work / f"node-round-{number}"
        started = time.perf_counter()
        aggregate_adapters(paths, out, strategy="fedex", weights=examples, rank=spec.rank,
                           settings=spec.settings)
        seconds.append(time.perf_counter() - started)
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(out / "adapter_model.safetensors"))
    delta = dict(iter_deltas(out / RESIDUAL_FILE))
    changes = {p: scale * (tensors[f"{p}.lora_B.weight"].double() @
                           tensors[f"{p}.lora_A.weight"].double()) + delta[p].double()
               for p in spec.modules}
    fetched = os.path.getsize(out / "adapter_model.safetensors") + os.path.getsize(
        out / RESIDUAL_FILE)
    rows.append(("chorus-p2p node (coordinator)", relative_error(changes, target),
                 statistics.median(seconds), fetched))

    dims = ", ".join(f"{p.split('.')[-1]} {d[0]}x{d[1]}" for p, d in
                     list(spec.modules.items())[:len(TARGETS)])
    print(f"vs Flower: {args.clients} clients, rank {args.rank}, {args.layers} layers ({dims}), "
          f"{args.rounds} rounds; {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}, "
          f"flwr {__import__('flwr').__version__}")
    print(f"{'aggregation':34} {'error vs float64 mean':>22} {'server ms/round':>16} "
          f"{'MB to each client/round':>24}")
    for name, error, secs, sent in rows:
        print(f"{name:34} {error:22.2e} {secs * 1000:16.1f} {sent / 1e6:24.2f}")
    print("(bytes: FedAvg sends the adapter; ExactLoRA and the node send the adapter and the "
          "round's factored D, never R)")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
