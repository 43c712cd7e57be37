"""The offline CLI: aggregate and fold work, and bad input gives one clear line and no output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chorus_p2p.cli.main import main
from chorus_p2p.lora.residual import load_residual


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_aggregates_and_folds(tmp_path, tiny_base, client_adapters):
    out = tmp_path / "global"
    cmd = [sys.executable, "-m", "chorus_p2p.cli.main", "aggregate", "--strategy", "fedex-svd",
           "--weights", "1,2,3", "--rank", "4", "--out", str(out), *map(str, client_adapters)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fedex-svd: 3 adapters, 8 modules" in done.stdout
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                              "residual.safetensors", "aggregation.json"}
    residual = load_residual(out / "residual.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    left, right = residual.factors[prefix]
    assert left.dtype == torch.float32 and left.shape[0] == 64 and right.shape[1] == 64
    assert left.shape[1] == right.shape[0] <= (4 + 8 + 2) - 4

    folded = tmp_path / "folded"
    done = subprocess.run([sys.executable, "-m", "chorus_p2p.cli.main", "fold", "--base",
                           str(tiny_base), "--residual", str(out / "residual.safetensors"),
                           "--out", str(folded)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (folded / "config.json").is_file()
    before = load_file(str(tiny_base / "model.safetensors"))
    after = load_file(str(folded / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(after[key].double() - before[key].double(),
                          left.double() @ right.double(), atol=1e-6)


def test_aggregate_json_report(tmp_path, client_adapters, capsys):
    code, out, _ = run_cli(capsys, "aggregate", "--strategy", "fedex", "--json", "--out",
                           str(tmp_path / "g"), *map(str, client_adapters))
    assert code == 0
    report = json.loads(out)
    assert report["strategy"] == "fedex" and len(report["modules"]) == 8
    assert 0 < report["residual_energy"] < 1
    assert report["weights"] == pytest.approx([1 / 3] * 3)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _corrupt(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _unpair(folder):
    _rewrite(folder, lambda t: t.pop(Q0 + ".lora_B.weight"))


def _nan(folder):
    def edit(t):
        t[Q0 + ".lora_A.weight"][0, 0] = float("nan")
    _rewrite(folder, edit)


def _inf(folder):
    def edit(t):
        t[Q0 + ".lora_B.weight"][1, 0] = float("inf")
    _rewrite(folder, edit)


def _wrong_width(folder):
    def edit(t):
        t[Q0 + ".lora_A.weight"] = torch.randn(4, 65)
    _rewrite(folder, edit)


def _rank_mismatch(folder):
    def edit(t):
        t[Q0 + ".lora_B.weight"] = torch.randn(64, 3)
    _rewrite(folder, edit)


def _bad_config(folder):
    (folder / "adapter_config.json").write_text("{oops")


@pytest.mark.parametrize("damage,expected", [
    (_corrupt, "not a valid safetensors file"),
    (_truncate, "not a valid safetensors file"),
    (_unpair, "module model.layers.0.self_attn.q_proj: lora_B is missing"),
    (_nan, "module model.layers.0.self_attn.q_proj: lora_A contains NaN or Inf"),
    (_inf, "module model.layers.0.self_attn.q_proj: lora_B contains NaN or Inf"),
    (_wrong_width, "module model.layers.0.self_attn.q_proj: is a linear 64x65 but"),
    (_rank_mismatch, "module model.layers.0.self_attn.q_proj: lora_A is 4x64 but lora_B is 64x3"),
    (_bad_config, "bad adapter config"),
])
def test_bad_adapter_gives_one_line_and_writes_nothing(tmp_path, client_adapters, capsys,
                                                       damage, expected):
    bad = _copy(client_adapters[0], tmp_path / "bad-client")
    damage(bad)
    out = tmp_path / "global"
    code, stdout, err = run_cli(capsys, "aggregate", "--out", str(out), str(client_adapters[1]),
                                str(bad))
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chorus-node: error: ")
    assert "bad-client" in lines[0] and expected in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".global")] == []


@pytest.mark.parametrize("args,expected", [
    (["--weights", "1,2"], "got 2 weights for 3 adapters"),
    (["--weights", "1,0,2"], "weight 0.0 is not a positive finite number"),
    (["--weights", "1,-4,2"], "weight -4.0 is not a positive finite number"),
    (["--weights", "1,x,2"], "give comma-separated numbers"),
    (["--weights", "1,nan,2"], "weight nan is not a positive finite number"),
    (["--strategy", "fedex", "--rank", "2"], "--rank 2 needs --strategy fedex-svd"),
    (["--rank", "0"], "argument --rank: '0' must be a whole number >= 1"),
])
def test_bad_weights_and_options_are_usage_errors(tmp_path, client_adapters, capsys, args, expected):
    out = tmp_path / "global"
    code, _, err = run_cli(capsys, "aggregate", "--out", str(out), *args, *map(str, client_adapters))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err
    assert not out.exists()


def test_missing_file_and_existing_output(tmp_path, client_adapters, capsys):
    code, _, err = run_cli(capsys, "aggregate", "--out", str(tmp_path / "g"),
                           str(tmp_path / "nope"))
    assert code == 3 and "nope: no such file or folder" in err
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "aggregate", "--out", str(existing), str(client_adapters[0]))
    assert code == 2 and "already exists" in err
    assert (existing / "keep.txt").read_text() == "precious"
    code, _, _ = run_cli(capsys, "aggregate", "--force", "--out", str(existing), str(client_adapters[0]))
    assert code == 0 and not (existing / "keep.txt").exists()


def test_unknown_strategy_is_argparse_usage_error(tmp_path, client_adapters, capsys):
    code = main(["aggregate", "--strategy", "median", "--out", str(tmp_path / "g"),
                 str(client_adapters[0])])
    assert code == 2 and "invalid choice: 'median'" in capsys.readouterr().err
