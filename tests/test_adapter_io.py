"""Reading PEFT adapters: scales, patterns and bare files agree with PEFT's own merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from chorus_p2p.errors import AdapterError
from chorus_p2p.exactness import merged_state, merged_state_without_adapter
from chorus_p2p.lora.adapter_io import AdapterSource
from chorus_p2p.lora.config import LoraSettings, module_name_from_prefix


@pytest.mark.parametrize("index", [0, 1, 2])
def test_factors_reproduce_peft_delta(tiny_base, client_adapters, index):
    """(A, B, scale) as we read them == what PEFT adds to the base weight when merging."""
    merged = merged_state(tiny_base, client_adapters[index])
    base = merged_state_without_adapter(tiny_base)
    with AdapterSource(client_adapters[index]) as source:
        assert len(source.modules) == 8
        for prefix in source.modules:
            f = source.factors(prefix)
            key = module_name_from_prefix(prefix) + ".weight"
            delta = merged[key].double() - base[key].double()
            ours = f.scale * f.B.double() @ f.A.double()
            assert torch.allclose(ours, delta, atol=1e-6), prefix


def test_rank_pattern_and_rslora_scales(client_adapters):
    with AdapterSource(client_adapters[1]) as rs:  # rank 8, alpha 16, rsLoRA
        prefix = rs.modules[0]
        assert rs.factors(prefix).scale == pytest.approx(16 / 8 ** 0.5)
    with AdapterSource(client_adapters[2]) as pat:  # rank 2, v_proj rank 6, alpha 32
        v = next(p for p in pat.modules if p.endswith("v_proj"))
        q = next(p for p in pat.modules if p.endswith("q_proj"))
        assert pat.shapes[v].rank == 6 and pat.factors(v).scale == pytest.approx(32 / 6)
        assert pat.shapes[q].rank == 2 and pat.factors(q).scale == pytest.approx(32 / 2)


def test_alpha_pattern_matches_like_peft():
    settings = LoraSettings.from_json({"r": 8, "lora_alpha": 16, "alpha_pattern": {"q_proj": 4},
                                       "rank_pattern": {r"layers\.1\.self_attn\.v_proj": 2}})
    assert settings.scale_for("model.layers.0.self_attn.q_proj", 8) == pytest.approx(0.5)
    assert settings.scale_for("model.layers.0.self_attn.v_proj", 8) == pytest.approx(2.0)
    assert settings.rank_for("model.layers.1.self_attn.v_proj") == 2
    assert settings.rank_for("model.layers.0.self_attn.v_proj") == 8


def test_bare_safetensors_has_unit_scale(tmp_path, client_adapters):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(client_adapters[0] / "adapter_model.safetensors", bare)
    with AdapterSource(bare) as source:
        assert all(source.factors(p).scale == 1.0 for p in source.modules)
    # ...unless an adapter_config.json sits beside it.
    shutil.copy(client_adapters[0] / "adapter_config.json", tmp_path / "adapter_config.json")
    with AdapterSource(bare) as source:
        assert source.factors(source.modules[0]).scale == pytest.approx(8 / 4)


def test_unsupported_adapters_are_refused(tmp_path):
    save_file({"base_model.model.x.lora_magnitude_vector": torch.ones(3)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(AdapterError, match="DoRA"):
        AdapterSource(tmp_path / "d.safetensors")
    folder = tmp_path / "dora"
    folder.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.ones(2, 3),
               "base_model.model.x.lora_B.weight": torch.ones(3, 2)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        AdapterSource(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LORA"):
        AdapterSource(folder)


def test_all_finite_settles_with_one_sum_and_checks_an_overflowed_one():
    from chorus_p2p.lora.adapter_io import all_finite

    big = torch.full((4, 4), 3e38)  # finite, but its float32 sum overflows to Inf
    assert all_finite(torch.randn(8, 8)) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(8, 8)
        t[3, 5] = bad
        assert not all_finite(t), bad
    pair = torch.zeros(2)
    pair[0], pair[1] = float("inf"), -float("inf")  # sum NaN
    assert not all_finite(pair)


@pytest.mark.parametrize("strategy", ["fedex-svd", "fedex", "fedavg"])
def test_modules_on_a_pool_give_what_one_thread_gives(tmp_path, client_adapters, monkeypatch,
                                                       strategy):
    """The thin QRs of the next modules run on a pool of one-thread workers while this thread
    finishes one (issue 25): the products and the residuals are those of the one-thread run,
    in the same module order, and a bad factor read ahead is still refused by name."""
    from safetensors.torch import load_file

    from chorus_p2p.lora.aggregate import aggregate_adapters, qr_workers

    weights = [3.0, 1.0, 2.0]
    outputs = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("CHORUS_AGGREGATION_THREADS", threads)
        assert qr_workers() == int(threads)
        before = torch.get_num_threads()
        report = aggregate_adapters(client_adapters, tmp_path / threads, strategy=strategy,
                                    weights=weights, hash_residual=True)
        assert torch.get_num_threads() == before  # this thread's setting is given back
        outputs[threads] = report
    one, pooled = outputs["1"], outputs["3"]
    if strategy != "fedavg":  # the hash taken while writing is the file's (a node adopts by it)
        import hashlib

        for threads, report in outputs.items():
            written = (tmp_path / threads / "residual.safetensors").read_bytes()
            assert report.residual_sha256 == hashlib.sha256(written).hexdigest()
    else:
        assert one.residual_sha256 is None
    assert [m.module for m in one.modules] == [m.module for m in pooled.modules]
    assert [m.residual_rank for m in one.modules] == [m.residual_rank for m in pooled.modules]
    if strategy != "fedavg":
        a, b = (load_file(str(tmp_path / t / "residual.safetensors")) for t in ("1", "3"))
        for key in (k for k in a if k.endswith("left")):
            right = key[: -len("left")] + "right"
            da = a[key].double() @ a[right].double()
            db = b[key].double() @ b[right].double()
            assert float((da - db).norm()) <= 1e-5 * max(float(da.norm()), 1e-12), key
    # a NaN in the last module, read ahead while earlier ones are on the pool: refused by name
    broken = tmp_path / "broken"
    shutil.copytree(client_adapters[1], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    last = sorted(k for k in tensors if "lora_A" in k)[-1]
    tensors[last][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN or Inf"):
        aggregate_adapters([client_adapters[0], broken, client_adapters[2]], tmp_path / "bad",
                           strategy=strategy, weights=weights)
    assert not (tmp_path / "bad").exists()
    assert torch.get_num_threads() == before
