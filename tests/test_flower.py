"""ExactLoRA inside a real Flower run: SuperLink, 3 SuperNodes and ``flwr run`` on loopback.

The deployment engine's own processes (Flower 1.42 runs every ServerApp and ClientApp task in a
subprocess of its own), the example app from ``examples/flower``, 3 clients x 3 rounds of real
training. Then the exactness claim through PEFT's loader: ``W0 + R + B A`` after round 3 equals
the weighted mean of the 3 clients' merged models, and every client's ``R`` is the server's,
byte for byte, though it never received it dense.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the flower extra is not installed")

from chorus_p2p.exactness import merged_state, weighted_mean_state  # noqa: E402
from chorus_p2p.flower.local_run import LocalFlower  # noqa: E402
from chorus_p2p.lora.fold import fold_base  # noqa: E402
from chorus_p2p.federation.spec import FederationSpec  # noqa: E402
from chorus_p2p.state.store import StateStore  # noqa: E402

pytestmark = pytest.mark.timeout(900)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"
TARGETS = ("q_proj", "v_proj")


def dense_state(root: Path, spec: FederationSpec) -> dict[str, torch.Tensor]:
    store = StateStore(root, spec.modules, transposed=spec.transposed)
    return {prefix: delta.clone() for prefix, delta in store.read(store.round)}


def moved_federation(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    """What README's move from nodes to Flower produces: a node's latest global adapter and a
    base with its R folded in (`pull --cumulative`, then `fold`). Here R is one round of two
    random clients, so the run starts from a non-zero R and a trained-looking adapter."""
    from chorus_p2p.lora.aggregate import aggregate_adapters
    from chorus_p2p.lora.residual import RESIDUAL_FILE
    from chorus_p2p.tiny import write_random_update

    spec = FederationSpec.build(str(model), 8, 16.0, TARGETS)
    updates = [str(write_random_update(tmp_path / f"node-update-{i}.safetensors", spec, i))
               for i in range(2)]
    aggregate_adapters(updates, tmp_path / "node-global", rank=8, settings=spec.settings)
    fold_base(model, tmp_path / "node-global" / RESIDUAL_FILE, tmp_path / "base+R-of-nodes")
    return tmp_path / "base+R-of-nodes", tmp_path / "node-global"


def test_exact_lora_in_a_real_flower_run(tmp_path, tiny_lm_dir):
    work = tmp_path / "work"
    base, adapter = moved_federation(tmp_path, tiny_lm_dir)
    with LocalFlower(3, workdir=tmp_path / "flower") as flower:
        flower.run(EXAMPLE, {"num-server-rounds": 2, "steps": 3, "model": str(base),
                             "initial-adapter": str(adapter), "workdir": str(work),
                             "keep-updates": True, "target-modules": ",".join(TARGETS)},
                   timeout=800)
    server = next(work.glob("server-run-*"))
    result = json.loads((server / "result.json").read_text())
    assert sorted(result["train"], key=int) == ["1", "2"]
    assert all(m["train-loss"] > 0 for m in result["train"].values())
    assert sorted(result["server_evaluate"], key=int) == ["1", "2"]

    spec = FederationSpec.build(str(base), 8, 16.0, TARGETS)
    # W0 + R after rounds 1 and 2, from the rounds' D's as the server kept them (2 rounds: the
    # second trains on a non-zero R, which is what the identity must survive)
    for number in (1, 2):
        fold_base(base, server / "deltas" / f"round-{number}.safetensors",
                  tmp_path / f"base+R{number}")
        base = tmp_path / f"base+R{number}"
    base_r1, base_r2 = tmp_path / "base+R1", tmp_path / "base+R2"
    # The exactness identity through PEFT: base + R2 + global adapter == weighted mean of the
    # clients' round-2 models (each trained on base + R1 + the round-1 global adapter)
    round2 = server / "rounds" / "round-2"
    report = json.loads((round2 / "aggregation.json").read_text())
    updates = [round2 / "updates" / label.replace(" ", "-") for label in report["clients"]]
    assert len(updates) == 3 and all(u.is_dir() for u in updates)
    got = merged_state(base_r2, round2)
    mean = weighted_mean_state([merged_state(base_r1, u) for u in updates], report["weights"])
    worst = max(float((got[k].double() - mean[k]).norm() / mean[k].norm())
                for k in mean if any(t in k for t in TARGETS))
    assert worst <= 1e-5, worst
    # Round 1 trained from the moved federation's adapter (not PEFT's init, whose B is zero)
    from safetensors.torch import load_file
    start = load_file(str(adapter / "adapter_model.safetensors"))
    for update in (server / "rounds" / "round-1" / "updates").iterdir():
        trained = load_file(str(update / "adapter_model.safetensors"))
        for key in (k for k in start if "lora_B" in k):
            assert (trained[key] - start[key]).norm() < 0.5 * start[key].norm(), key
    # Every client folded the same D's into its own R: byte-identical to the server's
    theirs = dense_state(server / "state", spec)
    clients = sorted((work / "clients").glob("run-*/node-*/state"))
    assert len(clients) == 3
    for client in clients:
        mine = dense_state(client, spec)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), client


def test_a_client_folds_the_deltas_it_lacks_and_refuses_a_gap(tmp_path, tiny_base):
    """What each message carries: the D's from the node's last known round on. A client adds
    those it lacks in order (twice-sent ones once), and refuses a gap or another spec clearly
    instead of training on the wrong model."""
    from flwr.app import ConfigRecord, RecordDict
    from safetensors.torch import save_file

    from chorus_p2p.flower.client import ExactLoRAClient, StateGap
    from chorus_p2p.flower.records import STATE_KEY, add_delta
    from chorus_p2p.lora.residual import LEFT_SUFFIX, RESIDUAL_METADATA, RIGHT_SUFFIX

    spec = FederationSpec.build(str(tiny_base), 4, 8.0, TARGETS)
    torch.manual_seed(3)
    expected: dict[str, torch.Tensor] = {}
    content = RecordDict()
    for number in (1, 2):
        tensors = {}
        for prefix, (d_out, d_in) in spec.modules.items():
            left, right = torch.randn(d_out, 3), torch.randn(3, d_in)
            tensors[prefix + LEFT_SUFFIX], tensors[prefix + RIGHT_SUFFIX] = left, right
            expected[prefix] = expected.get(prefix, 0) + left.double() @ right.double()
        save_file(tensors, str(tmp_path / f"d{number}.safetensors"), metadata=RESIDUAL_METADATA)
        add_delta(content, number, tmp_path / f"d{number}.safetensors")

    def state_of(range_, fingerprint=spec.fingerprint()):
        content[STATE_KEY] = ConfigRecord({"from-round": range_[0], "to-round": range_[1],
                                           "spec": fingerprint})
        return content

    client = ExactLoRAClient(tiny_base, spec, tmp_path / "client")
    store = StateStore(tmp_path / "client-state", spec.modules, transposed=spec.transposed)
    (tmp_path / "scratch").mkdir()
    client._catch_up(store, state_of((0, 1)), tmp_path / "scratch")
    assert store.round == 1
    client._catch_up(store, state_of((0, 2)), tmp_path / "scratch")  # round 1 again: skipped
    assert store.round == 2
    got = dict(store.read(2))
    assert all(torch.allclose(got[p].double(), expected[p], rtol=0, atol=1e-5) for p in expected)

    fresh = StateStore(tmp_path / "wiped", spec.modules, transposed=spec.transposed)
    with pytest.raises(StateGap, match="R is at round 0 but the server sent rounds 2..2"):
        client._catch_up(fresh, state_of((1, 2)), tmp_path / "scratch")
    with pytest.raises(StateGap, match="spec differs"):
        client._catch_up(fresh, state_of((0, 2), "0" * 16), tmp_path / "scratch")
    assert fresh.round == 0  # refused before anything was applied


def test_a_bad_client_reply_is_left_out_not_fatal(tmp_path, tiny_base):
    """A NaN adapter, one of the wrong rank and a zero weight are each left out with the
    reason (the checks a node makes at upload); the round aggregates the good ones exactly and
    the run goes on. Through Flower's Strategy.start with a grid that answers in-process."""
    from flwr.app import MetricRecord, RecordDict

    from chorus_p2p.flower import ExactLoRA
    from chorus_p2p.flower.inprocess import PreparedGrid
    from chorus_p2p.flower.records import adapter_record
    from chorus_p2p.lora.fold import iter_deltas

    spec = FederationSpec.build(str(tiny_base), 4, 8.0, TARGETS)
    gen = torch.Generator().manual_seed(5)

    def adapter(rank=4, poison=False):
        tensors = {}
        for prefix, (d_out, d_in) in spec.modules.items():
            tensors[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(rank, d_in, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(d_out, rank, generator=gen)
        if poison:
            next(iter(tensors.values()))[0, 0] = float("nan")
        return tensors

    good = [adapter(), adapter()]
    replies = [(good[0], 30), (adapter(poison=True), 10), (good[1], 10), (adapter(rank=2), 10),
               (adapter(), 0)]

    def reply(i, message):
        tensors, examples = replies[i]
        return RecordDict({"arrays": adapter_record(tensors),
                           "metrics": MetricRecord({"num-examples": examples})})
    strategy = ExactLoRA(spec, tmp_path / "server", fraction_evaluate=0.0, min_train_nodes=5,
                         min_available_nodes=5)
    result = strategy.start(PreparedGrid(5, reply), strategy.initial_arrays("t"), num_rounds=2)
    reasons = strategy.excluded[1]
    assert len(reasons) == 3 and len(strategy.excluded[2]) == 3
    assert any("node 2: non_finite" in r for r in reasons)
    assert any("node 4: wrong_shape" in r for r in reasons)
    assert any("node 5: bad_request" in r for r in reasons)
    # round 2: the exact weighted mean (3:1) of the two good clients' products
    state = result.arrays.to_torch_state_dict()
    delta = dict(iter_deltas(strategy.deltas / "round-2.safetensors"))
    for prefix in spec.modules:
        mean = sum(w * spec.scale * (t[f"{prefix}.lora_B.weight"].double() @
                                     t[f"{prefix}.lora_A.weight"].double())
                   for w, t in zip((0.75, 0.25), good))
        got = spec.scale * (state[f"{prefix}.lora_B.weight"].double() @
                            state[f"{prefix}.lora_A.weight"].double()) + delta[prefix].double()
        assert float((got - mean).norm() / mean.norm()) <= 1e-5, prefix
    assert strategy.state.round == 2 and result.train_metrics_clientapp[2]["excluded"] == 3


def test_a_dp_policy_on_the_server_refuses_replies_as_a_node_does(tmp_path, tiny_base):
    """Issue 26 #5 for Flower: with ``dp_policy`` the strategy takes only replies that declare
    local DP at least that strong and carry the noise they declare, measured from the adapter
    it sent; a raw reply and a forged declaration are left out with the node's codes."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from safetensors.torch import load_file

    from chorus_p2p.flower import ExactLoRA
    from chorus_p2p.flower.inprocess import PreparedGrid
    from chorus_p2p.flower.records import DP_KEY, adapter_record, write_adapter_file
    from chorus_p2p.federation.dp_policy import DPPolicy, read_declaration
    from chorus_p2p.tiny import write_random_update
    from chorus_p2p.train.privacy import BudgetFile, DPConfig, PrivacyBudget, privatize_file

    spec = FederationSpec.build(str(tiny_base), 4, 8.0, TARGETS)
    config = DPConfig(epsilon=100.0, clip=0.5, noise_multiplier=1.0)

    def reply(i, message):
        sent = write_adapter_file(message.content.array_records["arrays"],
                                  tmp_path / f"sent-{i}.safetensors")
        trained = write_random_update(tmp_path / f"trained-{i}.safetensors", spec, seed=i)
        content = RecordDict({"metrics": MetricRecord({"num-examples": 10})})
        if i == 0:  # raw: no declaration
            content["arrays"] = adapter_record(load_file(str(trained)))
            return content
        noised = tmp_path / f"noised-{i}.safetensors"
        privatize_file(sent, trained, noised, PrivacyBudget(
            BudgetFile(tmp_path / f"budget-{i}.json"), config))
        declared = read_declaration(noised)
        # node 2 declares the noise but sends its raw adapter; nodes 3 and 4 are honest
        content["arrays"] = adapter_record(load_file(str(trained if i == 1 else noised)))
        content[DP_KEY] = ConfigRecord(declared)
        return content

    strategy = ExactLoRA(spec, tmp_path / "server", fraction_evaluate=0.0, min_train_nodes=4,
                         min_available_nodes=4, dp_policy=DPPolicy(max_epsilon=100.0,
                                                                   min_noise=1.0))
    strategy.start(PreparedGrid(4, reply), strategy.initial_arrays("t"), num_rounds=1)
    reasons = strategy.excluded[1]
    assert len(reasons) == 2, reasons
    assert any("node 1: dp_required" in r for r in reasons)
    assert any("node 2: dp_noise_missing" in r for r in reasons)
    assert strategy.state.round == 1  # the two honest ones aggregated


@pytest.mark.parametrize("mechanism", ["gaussian-local", "dp-sgd"])
def test_a_dp_client_trains_and_its_noised_reply_passes_the_servers_policy(tmp_path,
                                                                         tiny_lm_dir,
                                                                         mechanism):
    """``ExactLoRAClient(dp=...)``: real training on the tiny model, the change clipped and
    noised before it leaves (or, under DP-SGD, every step's per-record gradients), no losses in
    the reply, a declaration the strategy's policy accepts (noise measured under local DP); two
    rounds, one budget file that counts both."""
    from flwr.app import Context, RecordDict

    from chorus_p2p.flower import ExactLoRA, ExactLoRAClient
    from chorus_p2p.flower.inprocess import PreparedGrid
    from chorus_p2p.flower.records import DP_KEY
    from chorus_p2p.federation.dp_policy import DPPolicy
    from chorus_p2p.train.data import Dataset
    from chorus_p2p.train.privacy import DPConfig
    from chorus_p2p.train.trainer import TrainConfig

    spec = FederationSpec.build(str(tiny_lm_dir), 4, 8.0, TARGETS)
    data = Dataset.load(str(Path(__file__).resolve().parents[1] / "examples" / "data" /
                            "kitchen.jsonl"))
    clients = [ExactLoRAClient(tiny_lm_dir, spec, tmp_path / f"client-{i}",
                               dp=DPConfig(epsilon=100.0, clip=0.5, noise_multiplier=1.0,
                                           mechanism=mechanism))
               for i in range(2)]
    replies = []

    def reply(i, message):
        context = Context(run_id=1, node_id=i + 1, node_config={}, state=RecordDict(),
                          run_config={})
        answer = clients[i].train(message, context, data, TrainConfig(steps=2, seed=i))
        replies.append(answer.content)
        return answer.content

    strategy = ExactLoRA(spec, tmp_path / "server", fraction_evaluate=0.0, min_train_nodes=2,
                         min_available_nodes=2,
                         dp_policy=DPPolicy(max_epsilon=100.0, min_noise=1.0,
                                            mechanism=mechanism))
    strategy.start(PreparedGrid(2, reply), strategy.initial_arrays("t"), num_rounds=2)
    assert strategy.excluded == {} and strategy.state.round == 2
    assert all("train-loss" not in c["metrics"] for c in replies)
    assert [int(c.config_records[DP_KEY]["releases"]) for c in replies] == [1, 1, 2, 2]
    assert {c.config_records[DP_KEY]["mechanism"] for c in replies} == {mechanism}
