"""A tiny Llama built from a config, and client adapters for it, all offline.

Tests, the demo and the benchmarks need a real ``transformers`` model and real PEFT adapters but
must never download anything; a 2-layer Llama with a 64-wide hidden state builds in milliseconds
and exercises exactly the code paths a 3B model does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def quiet_transformers() -> None:
    """No hub access and no per-load progress bars: everything here is local and small."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def tiny_llama_config(vocab_size: int = 512, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       chorus_seq_len=64)


def build_tiny_model(seed: int = 0, **config_overrides):
    """A randomly initialised ``LlamaForCausalLM`` in float32, deterministic in ``seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    return model.to(torch.float32).eval()


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    build_tiny_model(seed).save_pretrained(path, safe_serialization=True)
    return path


def make_client_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int, rank: int = 4,
                        alpha: float = 8.0, use_rslora: bool = False,
                        target_modules: Sequence[str] = TARGET_MODULES,
                        rank_pattern: dict[str, int] | None = None, spread: float = 0.05) -> Path:
    """A PEFT adapter as if a client had trained: both factors random, B non-zero.

    PEFT initialises ``B = 0``; a trained client never sends that, and a zero ``B`` would hide
    every mistake in the aggregation, so we draw both factors.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora,
                        target_modules=list(target_modules), rank_pattern=rank_pattern or {},
                        lora_dropout=0.0, init_lora_weights=True)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * spread)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def write_random_update(path: str | Path, spec, seed: int, scale: float = 0.05) -> Path:
    """A bare safetensors update with a federation's exact shapes (no model load: fast).

    ``spec`` is a :class:`chorus_p2p.federation.spec.FederationSpec`; both factors are random, as if
    a client had trained."""
    from safetensors.torch import save_file

    from chorus_p2p.lora.adapter_io import factor_keys

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, (d_out, d_in) in spec.modules.items():
        key_a, key_b = factor_keys(prefix)
        tensors[key_a] = torch.randn(spec.rank, d_in, generator=gen) * scale
        tensors[key_b] = torch.randn(d_out, spec.rank, generator=gen) * scale
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
