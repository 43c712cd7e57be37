"""Folding residuals into base weights: folders, single files, shards, loaded models, dense R."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from chorus_p2p.cli.main import main
from chorus_p2p.lora.fold import fold_base, fold_into_model, weight_key
from chorus_p2p.lora.residual import FactoredResidual, load_residual
from chorus_p2p.tiny import build_tiny_model

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"


def _residual(seed=0) -> FactoredResidual:
    gen = torch.Generator().manual_seed(seed)
    return FactoredResidual({
        Q0: (torch.randn(64, 3, generator=gen), torch.randn(3, 64, generator=gen)),
        V1: (torch.randn(32, 2, generator=gen), torch.randn(2, 64, generator=gen)),
    })


def test_fold_single_file_and_loaded_model_agree(tmp_path, tiny_base):
    residual = _residual()
    residual.save(tmp_path / "r.safetensors")
    out = tmp_path / "folded.safetensors"
    changed = fold_base(tiny_base / "model.safetensors", tmp_path / "r.safetensors", out)
    assert sorted(changed) == ["model.layers.0.self_attn.q_proj.weight",
                               "model.layers.1.self_attn.v_proj.weight"]
    folded = load_file(str(out))
    model = build_tiny_model(seed=0)
    fold_into_model(model, load_residual(tmp_path / "r.safetensors"))
    for key, value in model.state_dict().items():
        if key in folded:
            assert torch.allclose(folded[key], value, atol=1e-6), key
    base = load_file(str(tiny_base / "model.safetensors"))
    assert torch.allclose(folded["model.layers.0.self_attn.q_proj.weight"].double(),
                          base["model.layers.0.self_attn.q_proj.weight"].double() + residual.dense(Q0),
                          atol=1e-5)


def test_fold_sharded_bf16_base_upcasts_targets(tmp_path, tiny_base):
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(tiny_base / "model.safetensors")).items()}
    keys = sorted(state)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(shard_dir / name), metadata={"format": "pt"})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    (shard_dir / "config.json").write_text((tiny_base / "config.json").read_text())
    _residual().save(tmp_path / "r.safetensors")
    fold_base(shard_dir, tmp_path / "r.safetensors", tmp_path / "out")
    merged = {}
    for name in halves:
        merged.update(load_file(str(tmp_path / "out" / name)))
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert merged["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_fold_refuses_mismatched_residual_and_writes_nothing(tmp_path, tiny_base, capsys):
    bad = FactoredResidual({Q0: (torch.randn(65, 2), torch.randn(2, 64))})
    bad.save(tmp_path / "bad.safetensors")
    code = main(["fold", "--base", str(tiny_base), "--residual", str(tmp_path / "bad.safetensors"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3 and "module model.layers.0.self_attn.q_proj" in err and "65x64" in err
    assert not (tmp_path / "out").exists()
    unknown = FactoredResidual({"base_model.model.model.layers.9.mlp.x": (torch.ones(2, 1), torch.ones(1, 2))})
    unknown.save(tmp_path / "unknown.safetensors")
    code = main(["fold", "--base", str(tiny_base), "--residual", str(tmp_path / "unknown.safetensors"),
                 "--out", str(tmp_path / "out")])
    assert code == 3 and "base has no weight" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    code = main(["fold", "--base", str(tiny_base), "--residual", str(tmp_path / "junk.safetensors"),
                 "--out", str(tmp_path / "out")])
    assert code == 3 and "not a valid safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fold_accepts_a_dense_state_file(tmp_path, tiny_base):
    """A node's R (dense, ``pull --cumulative``) folds like a factored D does."""
    from chorus_p2p.state.store import StateStore

    shapes = {Q0: (64, 64), V1: (32, 64)}
    store = StateStore(tmp_path / "state", shapes)
    expected = {p: torch.zeros(s, dtype=torch.float64) for p, s in shapes.items()}
    for number, seed in enumerate((3, 4), start=1):
        step = _residual(seed)
        step.save(tmp_path / f"d{number}.safetensors")
        store.apply(number, tmp_path / f"d{number}.safetensors")
        for prefix in expected:
            expected[prefix] += step.dense(prefix)
    store.write_copy(2, tmp_path / "R.safetensors")
    assert main(["fold", "--base", str(tiny_base), "--residual", str(tmp_path / "R.safetensors"),
                 "--out", str(tmp_path / "folded")]) == 0
    base = load_file(str(tiny_base / "model.safetensors"))
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))
    for prefix, delta in expected.items():
        key = weight_key(prefix)
        assert torch.allclose(folded[key].double(), base[key].double() + delta, atol=1e-5)


def test_streaming_writer_round_trips_through_safe_open(tmp_path):
    from safetensors import safe_open

    from chorus_p2p.lora.safetensors_stream import StreamingSafetensorsWriter

    tensors = {"b.left": torch.randn(5, 3), "a.right": torch.randn(3, 7, dtype=torch.float64),
               "c.half": torch.randn(2, 2).to(torch.bfloat16), "d.empty": torch.zeros(4, 0)}
    writer = StreamingSafetensorsWriter(tmp_path)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish(tmp_path / "x.safetensors", {"format": "chorus-residual"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "chorus-residual"}
        assert sorted(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor), name
