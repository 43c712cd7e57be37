"""The headline claim, end to end through PEFT's own loading code.

base + folded residual + new global adapter, loaded with ``PeftModel.from_pretrained`` and merged
with ``merge_and_unload``, equals the weighted mean of the clients' merged weights.
"""

from __future__ import annotations

import pytest
import torch

from chorus_p2p.exactness import logits_of, merged_state, weighted_mean_state
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.fold import fold_base
from chorus_p2p.lora.residual import RESIDUAL_FILE

WEIGHTS = [120.0, 35.0, 300.0]


@pytest.fixture(scope="module")
def client_states(tiny_base, client_adapters):
    return [merged_state(tiny_base, d) for d in client_adapters]


def _target_keys(tiny_base, client_states):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).state_dict()
    keys = [k for k in base if any(not torch.equal(s[k], base[k]) for s in client_states)]
    assert len(keys) == 2 * 4  # 2 layers x q/k/v/o
    return keys


@pytest.mark.parametrize("strategy,rank", [("fedex-svd", None), ("fedex-svd", 4), ("fedex", None)])
def test_global_model_is_the_exact_weighted_mean(tmp_path, tiny_base, client_adapters,
                                                 client_states, strategy, rank):
    out = tmp_path / "global"
    aggregate_adapters([str(p) for p in client_adapters], out, strategy=strategy,
                       weights=WEIGHTS, rank=rank)
    folded = tmp_path / "base+R"
    fold_base(tiny_base, out / RESIDUAL_FILE, folded)
    result = merged_state(folded, out)  # PEFT's loader and merge, not ours

    mean = weighted_mean_state(client_states, WEIGHTS)
    for key in _target_keys(tiny_base, client_states):
        err = float((result[key].double() - mean[key]).norm() / mean[key].norm())
        assert err <= 1e-5, f"{key}: relative error {err:.2e}"
    # Every other weight is untouched.
    for key in mean:
        if key not in _target_keys(tiny_base, client_states):
            assert torch.allclose(result[key].double(), mean[key], atol=1e-7), key

    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits_of(tiny_base, mean, tokens)
    got = logits_of(tiny_base, result, tokens)
    assert float((got - expected).norm() / expected.norm()) <= 1e-5


def test_fedavg_is_measurably_inexact(tmp_path, tiny_base, client_adapters, client_states):
    out = tmp_path / "global"
    aggregate_adapters([str(p) for p in client_adapters], out, strategy="fedavg", weights=WEIGHTS)
    assert not (out / RESIDUAL_FILE).exists()
    result = merged_state(tiny_base, out)
    mean = weighted_mean_state(client_states, WEIGHTS)
    worst = max(float((result[k].double() - mean[k]).norm() / mean[k].norm())
                for k in _target_keys(tiny_base, client_states))
    assert worst > 1e-2  # the error FedEx exists to remove


def test_rank_pattern_is_written_for_mixed_output_ranks(tmp_path, client_adapters):
    """Client 2 has v_proj at rank 6: the output keeps each module's widest rank via rank_pattern."""
    import json

    out = tmp_path / "global"
    aggregate_adapters([str(client_adapters[0]), str(client_adapters[2])], out, strategy="fedex")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert set(config["rank_pattern"].values()) == {6}
    assert len(config["rank_pattern"]) == 2  # v_proj in both layers
