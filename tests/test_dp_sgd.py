"""Record-level DP-SGD (issue 26 #6): per-record clipping checked against a record-by-record
float64 reference, noise and sampling of the right size from the OS's CSPRNG, an accountant
checked against Opacus's independent one, a budget that never mixes units, and a round trained,
released, declared and accepted by a federation whose policy requires DP-SGD, on a real node.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chorus_p2p.errors import UsageError
from chorus_p2p.federation.dp_policy import DECLARATION_KEY, UNITS, DPPolicy, check_update
from chorus_p2p.trust.identity import init_data_dir
from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.tiny import build_tiny_model, write_random_update
from chorus_p2p.train.data import Dataset
from chorus_p2p.train.dp_sgd import (DPSGDRelease, PrivateGradients, per_record_loss,
                                     plan_release, poisson_batch, record_examples)
from chorus_p2p.train.privacy import (BudgetExhausted, BudgetFile, BudgetMismatch, DPConfig,
                                      PrivacyBudget, epsilon_of, epsilon_of_releases,
                                      privatize_file, release_update, secure_normal)
from chorus_p2p.train.simulate import initial_state
from chorus_p2p.train.trainer import TrainConfig, train_round

from nodeutil import node_in_thread

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT / "examples" / "data" / "kitchen.jsonl"
TARGETS = ("q_proj", "v_proj")


def _peft_model(targets=TARGETS):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(build_tiny_model().double(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                      lora_dropout=0.0))
    for name, p in model.named_parameters():  # a B of zero makes A's gradient zero
        if "lora_B" in name or "lora_embedding_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _records(count: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Records of different lengths, padded into one batch as record_examples does."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3 + (5 * i) % 11 for i in range(count)]
    ids = torch.zeros((count, max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 512, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


def _reference_gradients(model, ids, mask) -> list[dict[str, torch.Tensor]]:
    """Each record's gradient alone, unpadded, by its own backward pass (float64)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for row in range(len(ids)):
        n = int(mask[row].sum())
        model.zero_grad()
        per_record_loss(model, ids[row:row + 1, :n], mask[row:row + 1, :n]).sum().backward()
        out.append({name: p.grad.detach().clone() for name, p in params})
    model.zero_grad()
    return out


def test_each_record_is_clipped_alone_and_the_sum_is_exact():
    """The private gradient (noise off) equals sum_i min(1, C / ||g_i||) g_i, with each g_i from
    the record's own unpadded backward pass: padding leaks nothing, no record counts more than
    C, and no record is lost."""
    model = _peft_model()
    ids, mask = _records()
    reference = _reference_gradients(model, ids, mask)
    norms = [math.sqrt(sum(float((g * g).sum()) for g in r.values())) for r in reference]
    clip = sorted(norms)[len(norms) // 2]  # half the records are clipped, half are not
    assert min(norms) < clip < max(norms)
    release = DPSGDRelease(noise=1.0, clip=clip, sampling_rate=0.5, steps=1)
    with PrivateGradients(model, release, records=12, noise=lambda shape: torch.zeros(shape)
                          ) as private:
        private.backward(ids, mask)
        got = {n: p.grad.clone() for n, p in private.params}
    expected_batch = 0.5 * 12
    for name, grad in got.items():
        want = sum(min(1.0, clip / norm) * r[name] for r, norm in zip(reference, norms))
        err = float((grad * expected_batch - want).abs().max()) / float(want.abs().max())
        assert err < 1e-10, (name, err)
    assert not any(getattr(p, "grad_sample", None) is not None for _, p in private.params)


def test_the_noise_is_sized_to_the_expected_batch_and_never_repeats():
    """An empty Poisson batch still releases a gradient: pure noise of std z C / (q N)."""
    model = _peft_model()
    release = DPSGDRelease(noise=1.5, clip=0.3, sampling_rate=0.1, steps=1)
    draws = []
    with PrivateGradients(model, release, records=40, noise=secure_normal) as private:
        for _ in range(2):
            private.backward(torch.zeros((0, 4), dtype=torch.long),
                             torch.zeros((0, 4), dtype=torch.long))
            draws.append(torch.cat([p.grad.flatten() for _, p in private.params]))
    sigma = 1.5 * 0.3 / (0.1 * 40)
    for draw in draws:
        n = draw.numel()
        assert abs(float(draw.std()) / sigma - 1) < 6 * math.sqrt(1 / (2 * n)), n
    correlation = float(torch.corrcoef(torch.stack(draws))[0, 1])
    assert abs(correlation) < 6 / math.sqrt(draws[0].numel())


def test_poisson_batches_take_each_record_at_the_sampling_rate():
    records, rate, draws = 50, 0.08, 3000
    counts = torch.zeros(records)
    sizes = []
    for _ in range(draws):
        chosen = poisson_batch(records, rate)
        counts[chosen] += 1
        sizes.append(len(chosen))
    mean, sd = records * rate, math.sqrt(records * rate * (1 - rate) / draws)
    assert abs(sum(sizes) / draws - mean) < 6 * sd
    per_record_sd = math.sqrt(draws * rate * (1 - rate))
    assert float((counts - draws * rate).abs().max()) < 6 * per_record_sd
    assert 0 in sizes  # the batch size is random, empty included: what the accountant assumes


def test_a_lora_layer_without_per_record_gradients_is_refused(tiny_base, tmp_path):
    """LoRA on an Embedding keeps its factors outside any layer Opacus hooks: refused before
    training from the federation's spec (a node exits 2), and by the step itself, never trained
    unclipped."""
    from chorus_p2p.node.service import Node

    from nodeutil import node_settings

    init_data_dir(tmp_path / "n", "lab")
    with pytest.raises(UsageError, match="the embedding .*embed_tokens"):
        Node(node_settings(tmp_path / "n", tiny_base, train=True, dataset=str(SHARD),
                           target_modules=("q_proj", "embed_tokens"), dp_mechanism="dp-sgd",
                           dp_epsilon=8.0, dp_clip=1.0))
    model = _peft_model(targets=("q_proj", "embed_tokens"))
    ids, mask = _records(3)
    with PrivateGradients(model, DPSGDRelease(1.0, 1.0, 0.5, 1), 6,
                          noise=secure_normal) as private:
        with pytest.raises(UsageError, match="embed_tokens.*not on Embedding"):
            private.backward(ids, mask)


def test_the_accountant_agrees_with_opacus_and_with_local_dp():
    """Ours composes with dp-accounting; Opacus's RDP accountant is a separate implementation
    of the same analysis. And one step at rate 1 is exactly one local-DP release."""
    from opacus.accountants import RDPAccountant

    for z, q, steps, rounds in ((1.0, 0.02, 30, 10), (0.8, 0.1, 50, 3), (2.0, 0.005, 100, 1)):
        ours = epsilon_of_releases([{"mechanism": "dp-sgd", "noise": z, "sampling_rate": q,
                                     "steps": steps}] * rounds, 1e-5)
        opacus = RDPAccountant()
        opacus.history = [(z, q, steps * rounds)]
        theirs = opacus.get_epsilon(1e-5)
        assert abs(ours / theirs - 1) < 0.05, (z, q, ours, theirs)
    assert epsilon_of_releases([{"mechanism": "dp-sgd", "noise": 2.0, "sampling_rate": 1.0,
                                 "steps": 1}], 1e-5) == pytest.approx(epsilon_of([2.0], 1e-5))
    # subsampling is why DP-SGD is cheap: the same noise over 30 steps at q = 0.02 costs less
    # than one whole-dataset release
    assert epsilon_of_releases([{"mechanism": "dp-sgd", "noise": 1.0, "sampling_rate": 0.02,
                                 "steps": 30}], 1e-5) < epsilon_of([1.0], 1e-5)


def test_one_budget_never_mixes_units(tmp_path, spec):
    start = write_random_update(tmp_path / "start.safetensors", spec, seed=0)
    raw = write_random_update(tmp_path / "raw.safetensors", spec, seed=1)
    local = DPConfig(epsilon=50.0, clip=0.5, noise_multiplier=1.0)
    record = DPConfig(epsilon=50.0, clip=0.5, noise_multiplier=1.0, mechanism="dp-sgd")
    privatize_file(start, raw, tmp_path / "u.safetensors",
                   PrivacyBudget(BudgetFile(tmp_path / "b.json"), local))
    with pytest.raises(BudgetMismatch, match="gaussian-local releases") as refused:
        PrivacyBudget(BudgetFile(tmp_path / "b.json"), record).validate()
    assert isinstance(refused.value, UsageError)  # exit 2 at start-up
    plan = DPSGDRelease(1.0, 0.5, 0.05, 20)
    release_update(PrivacyBudget(BudgetFile(tmp_path / "r.json"), record), start, raw,
                   tmp_path / "v.safetensors", plan)
    with pytest.raises(BudgetMismatch, match="dp-sgd releases"):
        privatize_file(start, raw, tmp_path / "u.safetensors",
                       PrivacyBudget(BudgetFile(tmp_path / "r.json"), local))


@pytest.fixture(scope="module")
def dp_sgd_round(tiny_lm_dir, tmp_path_factory):
    """One DP-SGD round on the tiny LM, released under a budget file."""
    root = tmp_path_factory.mktemp("dpsgd")
    spec = FederationSpec.build(str(tiny_lm_dir), 4, 8.0, TARGETS)
    start = initial_state(spec, "t", root / "round-0")
    config = DPConfig(epsilon=30.0, clip=1.0, noise_multiplier=1.0, mechanism="dp-sgd")
    budget = PrivacyBudget(BudgetFile(root / "budget.json"), config)
    plans = []
    result = train_round(tiny_lm_dir, start, None, Dataset.load(SHARD),
                         TrainConfig(steps=4, dp_sgd_clip=1.0, dp_sgd_noise=1.0), root / "c",
                         before_release=lambda plan: plans.append(budget.check(plan.to_json())))
    out = root / "update.safetensors"
    norm, spent = release_update(budget, start / "adapter_model.safetensors",
                                 result.adapter_dir / "adapter_model.safetensors", out,
                                 result.dp_release, round_no=1)
    return dict(root=root, start=start, result=result, out=out, norm=norm, spent=spent,
                plans=plans, budget=budget, spec=spec)


def test_a_dp_sgd_round_is_planned_priced_and_declared(dp_sgd_round):
    r = dp_sgd_round
    release = r["result"].dp_release
    texts = len(Dataset.load(SHARD).train)
    assert release == plan_release(texts, 8, 4, 1.0, 1.0)  # one record per text
    assert r["plans"] == [pytest.approx(r["spent"])]  # checked before the first step
    assert r["norm"] is None  # nothing pre-noise exists to report
    assert r["spent"] == pytest.approx(epsilon_of_releases([release.to_json()], 1e-5))
    with safe_open(str(r["out"]), framework="pt") as fh:
        declared = json.loads(fh.metadata()[DECLARATION_KEY])
    assert declared["mechanism"] == "dp-sgd" and declared["unit"] == UNITS["dp-sgd"]
    assert declared["sampling_rate"] == release.sampling_rate and declared["steps"] == 4
    trained = load_file(str(r["result"].adapter_dir / "adapter_model.safetensors"))
    sent = load_file(str(r["out"]))
    assert all(torch.equal(trained[k], sent[k]) for k in trained)  # the noise is in the steps
    recorded = json.loads(json.loads((r["root"] / "budget.json").read_text())["dp_releases"])
    assert recorded[0]["sampling_rate"] == release.sampling_rate and recorded[0]["round"] == 1


def test_a_dp_sgd_policy_takes_dp_sgd_and_only_it(dp_sgd_round, tmp_path):
    r = dp_sgd_round
    start = r["start"] / "adapter_model.safetensors"
    record_policy = DPPolicy(max_epsilon=30.0, min_noise=1.0, mechanism="dp-sgd")
    assert check_update(record_policy, r["out"], start)["mechanism"] == "dp-sgd"
    with pytest.raises(UpdateRejected, match="wanted 'gaussian-local'") as refused:
        check_update(DPPolicy(max_epsilon=30.0, min_noise=1.0), r["out"], start)
    assert refused.value.code == "dp_insufficient"
    with safe_open(str(r["out"]), framework="pt") as fh:
        declared = json.loads(fh.metadata()[DECLARATION_KEY])
    tensors = load_file(str(r["out"]))
    for forged, why in (({"epsilon": 0.01}, "less than this round alone"),
                        ({"noise": 0.5}, "noise multiplier 0.5 < 1"),
                        ({"sampling_rate": 0.0}, "sampling rate 0")):
        path = tmp_path / "forged.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", DECLARATION_KEY: json.dumps(
            {**declared, **forged})})
        with pytest.raises(UpdateRejected, match=why) as refused:
            check_update(record_policy, path, start)
        assert refused.value.code == "dp_insufficient"


def test_the_dp_sgd_budget_refuses_before_training(dp_sgd_round, tiny_lm_dir, tmp_path):
    """A round that would pass the budget stops before its first step, whatever was spent."""
    plan = dp_sgd_round["result"].dp_release.to_json()
    two_rounds = epsilon_of_releases([plan, plan], 1e-5)
    assert two_rounds > dp_sgd_round["spent"]
    config = DPConfig(epsilon=(two_rounds + dp_sgd_round["spent"]) / 2, clip=1.0,
                      noise_multiplier=1.0, mechanism="dp-sgd")
    budget = PrivacyBudget(BudgetFile(tmp_path / "b.json"), config)
    budget.record(1, plan)
    steps = []
    with pytest.raises(BudgetExhausted, match="one record"):
        train_round(tiny_lm_dir, dp_sgd_round["start"], None, Dataset.load(SHARD),
                    TrainConfig(steps=4, dp_sgd_clip=1.0, dp_sgd_noise=1.0), tmp_path / "c",
                    progress=lambda step, loss: steps.append(step),
                    before_release=lambda p: budget.check(p.to_json()))
    assert steps == [] and not (tmp_path / "c").exists()
    with pytest.raises(BudgetExhausted):  # and without a plan, the last round's stands in
        budget.check()


def test_records_are_texts_cut_never_packed(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    texts = ["short one", "a much longer text " * 20, "x"]
    ids, mask = record_examples(tokenizer, texts, seq_len=16)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    kept = [min(n, 16) for n in lengths if n >= 2]
    assert mask.sum(1).tolist() == kept and ids.shape[1] == max(kept)


def _wait_until(predicate, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_node_trains_with_dp_sgd_under_a_dp_sgd_policy(tmp_path, tiny_lm_dir):
    """``init --require-dp --dp-mechanism dp-sgd`` and ``up --train --dp-mechanism dp-sgd``:
    rounds commit with the node's declared DP-SGD updates, ``status`` reports the record-level
    epsilon, a local-DP ``train`` is refused, and a restart with local DP on the same data dir
    is refused rather than mixing units."""
    made = subprocess.run(
        [sys.executable, "-m", "chorus_p2p.cli.main", "init", "--data-dir", str(tmp_path / "n"),
         "--federation", "records-lab", "--require-dp", "--dp-max-epsilon", "40",
         "--dp-mechanism", "dp-sgd"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert "record-level DP-SGD required" in made.stdout
    dp = dict(dp_epsilon=40.0, dp_clip=1.0, dp_noise=1.0)
    with node_in_thread(tmp_path / "n", tiny_lm_dir, min_updates=1, train=True,
                        dataset=str(SHARD), steps=3, target_modules=TARGETS,
                        dp_mechanism="dp-sgd", **dp) as node:
        _wait_until(lambda: (node.ledger.round(2) or {}).get("state") == "committed",
                    timeout=240)
        sha = node.ledger.updates(2)[0]["blob_sha"]
        with safe_open(str(node.blobs.path(sha)), framework="pt") as fh:
            declared = json.loads(fh.metadata()[DECLARATION_KEY])
        assert declared["mechanism"] == "dp-sgd" and declared["releases"] >= 2
        shown = subprocess.run(
            [sys.executable, "-m", "chorus_p2p.cli.main", "status", "--node", node.url,
             "--join", node.identity.join_token()], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "privacy     DP-SGD: epsilon" in shown.stdout
        assert f"unit: {UNITS['dp-sgd']}" in shown.stdout
        assert "dp policy   every update: dp-sgd, noise >= 1" in shown.stdout
        local = subprocess.run(
            [sys.executable, "-m", "chorus_p2p.cli.main", "train", "--node", node.url, "--join",
             node.identity.join_token(), "--client-id", "laptop", "--model", str(tiny_lm_dir),
             "--dataset", str(SHARD), "--rounds", "1", "--steps", "2", "--dp-epsilon", "40",
             "--dp-clip", "1"], capture_output=True, text=True, timeout=300,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
        assert local.returncode == 2 and "requires dp-sgd" in local.stderr
    from chorus_p2p.node.service import Node

    from nodeutil import node_settings

    with pytest.raises(UsageError, match="dp-sgd releases"):
        Node(node_settings(tmp_path / "n", tiny_lm_dir, train=True, dataset=str(SHARD),
                           dp_mechanism="gaussian-local", **dp))
