"""Differential privacy: clipping and noise on the update, the accountant, and the budget refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from chorus_p2p.train.privacy import (BudgetExhausted, DPConfig, PrivacyBudget, epsilon_after,
                                      privatize)

from nodeutil import start_node, wait_for

SHARD = Path(__file__).resolve().parents[1] / "examples" / "data" / "weather.jsonl"


def test_privatize_clips_the_change_and_adds_calibrated_noise():
    gen = torch.Generator().manual_seed(0)
    start = {"a": torch.zeros(200, 50), "b": torch.ones(50, 200)}
    trained = {"a": torch.full((200, 50), 0.5), "b": torch.ones(50, 200) * 1.5}
    quiet = DPConfig(epsilon=10, clip=1.0, noise_multiplier=1e-9)
    out, raw = privatize(start, trained, quiet, gen)
    assert raw == pytest.approx(math.sqrt(2 * 10000 * 0.25))
    change = math.sqrt(sum(float(((out[k].double() - start[k].double()) ** 2).sum()) for k in out))
    assert change == pytest.approx(1.0, rel=1e-5)  # clipped to C
    noisy = DPConfig(epsilon=10, clip=1.0, noise_multiplier=2.0)
    out, _ = privatize(start, start, noisy, gen)  # no change: what leaves is pure noise
    values = torch.cat([(out[k] - start[k]).flatten() for k in out])
    assert float(values.std()) == pytest.approx(2.0, rel=0.02)  # std = noise * C


def test_accountant_composes_rounds():
    config = DPConfig(epsilon=5.0, delta=1e-5, noise_multiplier=1.0)
    eps = [epsilon_after(k, config) for k in (1, 2, 8)]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert epsilon_after(0, config) == 0.0


class _Meta:
    def __init__(self):
        self.values = {}

    def get_meta(self, key, default=None):
        return self.values.get(key, default)

    def set_meta(self, key, value):
        self.values[key] = value


def test_budget_refuses_past_epsilon():
    config = DPConfig(epsilon=epsilon_after(2, DPConfig(1.0, noise_multiplier=1.0)) + 1e-6,
                      noise_multiplier=1.0)
    budget = PrivacyBudget(_Meta(), config)
    budget.check()
    budget.record()
    budget.check()
    budget.record()
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted: 2 round"):
        budget.check()


async def test_training_node_stops_submitting_when_the_budget_is_spent(tmp_path, tiny_lm_dir):
    one_round = epsilon_after(1, DPConfig(1.0, noise_multiplier=1.0))
    two_rounds = epsilon_after(2, DPConfig(1.0, noise_multiplier=1.0))
    node = await start_node(tmp_path / "node", tiny_lm_dir, min_updates=1, train=True,
                            dataset=str(SHARD), steps=2, target_modules=("q_proj", "v_proj"),
                            dp_epsilon=(one_round + two_rounds) / 2, dp_clip=0.5, dp_noise=1.0)
    try:
        await wait_for(lambda: (node.ledger.round(1) or {}).get("state") == "committed",
                       timeout=90)
        await wait_for(lambda: node.participant._budget_reported, timeout=30)
        assert node.ledger.get_meta("dp_rounds") == "1"
        assert float(node.ledger.get_meta("dp_epsilon")) == pytest.approx(one_round, rel=1e-4)
        update = node.ledger.updates(1)[0]
        assert update["eval_loss"] is None  # no side channel while DP is on
        assert node.ledger.updates(2) == []  # round 2 opened; this node refused to submit
    finally:
        await node.stop()
