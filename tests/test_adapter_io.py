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
