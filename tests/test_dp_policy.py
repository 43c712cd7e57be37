"""DP as the federation's rule, not each node's choice (issue 26 #5).

Before it, a new data dir, a restart without ``--dp-epsilon``, ``chorus-node train`` and the SDK
all sent raw updates and nothing refused them. Here a federation made with ``init --require-dp``
refuses, on a real node on loopback: an update that declares no DP, one that declares less than
the policy, and one that declares noise it does not carry; it accepts a noised one from the SDK
call and from ``chorus-node train``, whose budget survives the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chorus_p2p.client import AsyncNodeClient, NodeError
from chorus_p2p.errors import UsageError
from chorus_p2p.federation.dp_policy import DECLARATION_KEY, UNIT, DPPolicy, check_update
from chorus_p2p.trust.identity import init_data_dir, join_token_extras
from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.tiny import write_random_update
from chorus_p2p.train.privacy import (BudgetExhausted, BudgetFile, DPConfig, PrivacyBudget,
                                      epsilon_of, privatize_file)

from nodeutil import node_in_thread, start_node

SHARD = Path(__file__).resolve().parents[1] / "examples" / "data" / "kitchen.jsonl"
POLICY = DPPolicy(max_epsilon=60.0, min_noise=1.0)


def _global_adapter(node) -> Path:
    return node.blobs.path(node.ledger.round(0)["adapter_sha"])


def _forge(raw: Path, out: Path, **declared) -> Path:
    """``raw``'s tensors with a DP declaration in the header, and nothing else done."""
    body = {"mechanism": "gaussian-local", "noise": 1.0, "clip": 0.5, "delta": 1e-5,
            "epsilon": 5.0, "releases": 1, **declared}
    save_file(load_file(str(raw)), str(out),
              metadata={"format": "pt", DECLARATION_KEY: json.dumps(body)})
    return out


def test_a_token_carries_the_policy_and_a_joiner_takes_it(tmp_path):
    founder = init_data_dir(tmp_path / "a", "private-lab", dp_policy=POLICY.to_json())
    token = founder.join_token()
    assert join_token_extras(token)[3] == POLICY.to_json()
    joiner = init_data_dir(tmp_path / "b", join_token=token)
    assert joiner.dp_policy == POLICY.to_json()
    with pytest.raises(UsageError, match="founder's"):  # a joiner cannot pick its own
        init_data_dir(tmp_path / "c", join_token=token, dp_policy={"max_epsilon": 1e9,
                                                                   "min_noise": 1e-9})


async def test_the_federation_refuses_raw_weak_and_unnoised_updates(tmp_path, tiny_base, spec):
    init_data_dir(tmp_path / "n", "private-lab", dp_policy=POLICY.to_json())
    node = await start_node(tmp_path / "n", tiny_base, min_updates=2)
    try:
        secret = node.identity.secret
        start = _global_adapter(node)
        raw = write_random_update(tmp_path / "raw.safetensors", spec, seed=1)
        budget = PrivacyBudget(BudgetFile(tmp_path / "budget.json"),
                               DPConfig(epsilon=50, clip=0.5, noise_multiplier=1.0))
        noised = tmp_path / "noised.safetensors"
        raw_norm, spent = privatize_file(start, raw, noised, budget, round_no=1)
        assert raw_norm > 0 and 0 < spent < 50
        with safe_open(str(noised), framework="pt") as fh:
            declared = json.loads(fh.metadata()[DECLARATION_KEY])
        assert declared["noise"] == 1.0 and declared["releases"] == 1
        cases = {  # client -> (file, the code the node answers)
            "raw": (raw, "dp_required"),
            "weak": (_forge(raw, tmp_path / "weak.safetensors", noise=0.3), "dp_insufficient"),
            "spent": (_forge(raw, tmp_path / "spent.safetensors", epsilon=61.0),
                      "dp_insufficient"),
            "liar": (_forge(raw, tmp_path / "liar.safetensors"), "dp_noise_missing"),
        }
        for client, (path, code) in cases.items():
            async with AsyncNodeClient(node.url, secret=secret, client_id=client) as c:
                with pytest.raises(NodeError) as refused:
                    await c.submit(path, round=1, trained_from=0)
            assert refused.value.code == code, (client, refused.value)
            assert node.ledger.update(1, client) is None  # nothing recorded
        async with AsyncNodeClient(node.url, secret=secret, client_id="honest") as c:
            accepted = await c.submit(noised, round=1, trained_from=0)
            assert accepted["status"] == "accepted"
            assert (await c.federation())["dp_policy"] == POLICY.to_json()
        # a peer whose token had the policy stripped is not of this federation
        stripped = {**node.cluster.hello_body(), "node_id": "f" * 32, "dp_policy": None}
        with pytest.raises(UpdateRejected, match="DP policy"):
            node.cluster.on_hello(stripped)
    finally:
        await node.stop()


def test_the_noise_check_passes_honest_releases_and_fails_forged_ones(tmp_path, tiny_base,
                                                                      spec):
    """At several noise levels, 20 honest releases each pass the measurement, and the same
    change declared with that noise but sent raw fails it."""
    start = write_random_update(tmp_path / "start.safetensors", spec, seed=0)
    for noise in (1.0, 0.05):
        policy = DPPolicy(max_epsilon=1e9, min_noise=noise)
        for seed in range(20):
            raw = write_random_update(tmp_path / "raw.safetensors", spec, seed=seed + 1)
            budget = PrivacyBudget(BudgetFile(tmp_path / f"b-{noise}-{seed}.json"),
                                   DPConfig(epsilon=1e9, clip=0.2, noise_multiplier=noise))
            privatize_file(start, raw, tmp_path / "out.safetensors", budget)
            check_update(policy, tmp_path / "out.safetensors", start)
        forged = _forge(raw, tmp_path / "forged.safetensors", noise=noise, clip=0.2,
                        epsilon=epsilon_of([noise], 1e-5))  # an honest price: only noise lies
        with pytest.raises(UpdateRejected) as refused:
            check_update(policy, forged, start)
        assert refused.value.code == "dp_noise_missing"


def test_a_budget_file_keeps_what_was_spent_across_runs(tmp_path, spec):
    start = write_random_update(tmp_path / "start.safetensors", spec, seed=0)
    raw = write_random_update(tmp_path / "raw.safetensors", spec, seed=1)
    config = DPConfig(epsilon=12.0, clip=0.5, noise_multiplier=2.0)
    spent = [privatize_file(start, raw, tmp_path / "u.safetensors",
                            PrivacyBudget(BudgetFile(tmp_path / "b.json"), config))[1]
             for _ in range(2)]  # two runs, two fresh objects: one budget
    assert spent[1] > spent[0]
    assert PrivacyBudget(BudgetFile(tmp_path / "b.json"), config).rounds == 2
    with pytest.raises(BudgetExhausted):  # a larger budget is not a reset: 12 is not enough
        for _ in range(50):
            privatize_file(start, raw, tmp_path / "u.safetensors",
                           PrivacyBudget(BudgetFile(tmp_path / "b.json"), config))
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(BudgetExhausted, match="damaged"):  # never guessed as empty
        PrivacyBudget(BudgetFile(tmp_path / "b.json"), config).check()


def test_a_node_under_the_policy_will_not_train_without_dp(tmp_path, tiny_base):
    init_data_dir(tmp_path / "n", "private-lab", dp_policy=POLICY.to_json())
    from chorus_p2p.node.service import Node

    from nodeutil import node_settings

    with pytest.raises(UsageError, match="requires local DP"):
        Node(node_settings(tmp_path / "n", tiny_base, train=True, dataset=str(SHARD)))
    with pytest.raises(UsageError, match="weaker than this federation's policy"):
        Node(node_settings(tmp_path / "n", tiny_base, train=True, dataset=str(SHARD),
                           dp_epsilon=10.0, dp_clip=1.0, dp_noise=0.5))
    # and an identity re-made from a stripped token does not run on this data dir
    identity = json.loads((tmp_path / "n" / "federation.json").read_text())
    (tmp_path / "n" / "federation.json").write_text(json.dumps({**identity,
                                                                "dp_policy": None}))
    with pytest.raises(UsageError, match="does not change"):
        Node(node_settings(tmp_path / "n", tiny_base))


def _train(node, tiny_lm_dir, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chorus_p2p.cli.main", "train", "--node", node.url, "--join",
         node.identity.join_token(), "--client-id", "laptop", "--model", str(tiny_lm_dir),
         "--dataset", str(SHARD), "--rounds", "1", "--steps", "2", *extra],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "XDG_STATE_HOME": str(tmp_path / "state")})


def test_chorus_node_train_follows_the_policy_and_keeps_its_budget(tmp_path, tiny_lm_dir):
    init_data_dir(tmp_path / "n", "private-lab", dp_policy=POLICY.to_json())
    with node_in_thread(tmp_path / "n", tiny_lm_dir, min_updates=1,
                        target_modules=("q_proj", "v_proj")) as node:
        refused = _train(node, tiny_lm_dir, tmp_path)
        assert refused.returncode == 2 and "requires local DP" in refused.stderr
        assert node.ledger.update(1, "laptop") is None
        done = _train(node, tiny_lm_dir, tmp_path, "--dp-epsilon", "50", "--dp-clip", "0.5")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "(noised: local DP)" in done.stdout and "epsilon spent" in done.stderr
        update = node.ledger.update(1, "laptop")
        assert update is not None and update["eval_loss"] is None  # no loss side channel
    budget = tmp_path / "state" / "chorus-p2p" / "dp-budget-private-lab.json"
    assert len(json.loads(json.loads(budget.read_text())["dp_releases"])) == 1


async def test_a_training_node_meets_the_policy_with_its_own_updates(tmp_path, tiny_lm_dir):
    """``up --train --dp-*``: the node's own noised update passes its coordinator's checks,
    the noise measurement included, and the round commits with it."""
    init_data_dir(tmp_path / "n", "private-lab", dp_policy=POLICY.to_json())
    from nodeutil import wait_for

    node = await start_node(tmp_path / "n", tiny_lm_dir, min_updates=1, train=True,
                            dataset=str(SHARD), steps=2, target_modules=("q_proj", "v_proj"),
                            dp_epsilon=50.0, dp_clip=0.5, dp_noise=1.0)
    try:
        await wait_for(lambda: (node.ledger.round(1) or {}).get("state") == "committed",
                       timeout=120)
        assert [u["node_id"] for u in node.ledger.updates(1)] == [node.node_id]
        sha = node.ledger.updates(1)[0]["blob_sha"]
        with safe_open(str(node.blobs.path(sha)), framework="pt") as fh:
            assert json.loads(fh.metadata()[DECLARATION_KEY])["releases"] == 1
        # the epsilon is reported with what it protects (issue 26 #6), here and in `status`
        privacy = node.status()["privacy"]
        assert privacy["policy"] == POLICY.to_json()
        assert privacy["local"]["releases"] >= 1 and privacy["local"]["unit"] == UNIT
        import asyncio

        shown = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "chorus_p2p.cli.main", "status", "--node", node.url,
            "--join", node.identity.join_token()], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert f"unit: {UNIT}" in shown.stdout and "dp policy   every update: noise >= 1" \
            in shown.stdout
    finally:
        await node.stop()
