"""Every LoRA that PEFT makes, exact through PEFT's own loader.

For each model family and layer type, three clients make adapters with PEFT itself (different
ranks and alphas, a rank pattern on one), their factors and full tensors are randomised as if
trained, and the aggregate (``fedex-svd``), folded into the base with ``fold``, is loaded with
``PeftModel.from_pretrained`` + ``merge_and_unload``: every weight and the logits must equal the
weighted mean of the clients' merged models. Small models built from configs; nothing downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from chorus_p2p.errors import AdapterError
from chorus_p2p.exactness import auto_class, logits_of, merged_state, weighted_mean_state
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.fold import fold_base, fold_into_model
from chorus_p2p.lora.residual import RESIDUAL_FILE

WEIGHTS = [3.0, 1.0, 2.0]
CLIENTS = [dict(r=4, lora_alpha=8), dict(r=6, lora_alpha=24, use_rslora=True),
           dict(r=2, lora_alpha=4)]


def llama(**extra):
    from transformers import LlamaConfig

    options = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                   tie_word_embeddings=False)
    return LlamaConfig(**{**options, **extra})


def gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)


def bert():
    from transformers import BertConfig

    return BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, num_labels=3)


def qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)


@dataclass
class Case:
    name: str
    config: Callable[[], Any]
    lora: dict[str, Any]
    task_type: str = "CAUSAL_LM"
    pattern: dict[str, int] = field(default_factory=dict)


CASES = [
    Case("llama-all-linear", llama, dict(target_modules="all-linear"),
         pattern={"q_proj": 8}),
    Case("gpt2-conv1d", gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"],
                                   fan_in_fan_out=True), pattern={"c_fc": 8}),
    Case("bert-classifier", bert, dict(target_modules=["query", "value"]), task_type="SEQ_CLS"),
    Case("llama-classifier", lambda: llama(num_labels=3), dict(target_modules=["q_proj",
                                                                               "v_proj"]),
         task_type="SEQ_CLS"),
    Case("qwen2-gqa", qwen2, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
         pattern={"k_proj": 3}),
    Case("llama-embedding-and-lm-head", llama,
         dict(target_modules=["embed_tokens", "q_proj", "lm_head"])),
    Case("llama-modules-to-save", llama, dict(target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["lm_head", "embed_tokens"])),
]


def make_base(case: Case, folder) -> None:
    torch.manual_seed(0)
    model = auto_class(case.task_type).from_config(case.config()).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)


def make_client(case: Case, base, folder, k: int, options: dict | None = None) -> None:
    """A client as if trained: PEFT's own layers and config, every trainable tensor moved."""
    from peft import LoraConfig, get_peft_model

    model = auto_class(case.task_type).from_pretrained(base, dtype=torch.float32)
    if options is None:
        options = dict(CLIENTS[k])
        if k == 1 and case.pattern:
            options["rank_pattern"] = case.pattern
    config = LoraConfig(task_type=case.task_type, lora_dropout=0.0, **options, **case.lora)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(folder, safe_serialization=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_layer_type_is_exact_through_peft(tmp_path, case):
    base, auto = tmp_path / "base", auto_class(case.task_type)
    make_base(case, base)
    clients = [tmp_path / f"client{k}" for k in range(3)]
    for k, folder in enumerate(clients):
        make_client(case, base, folder, k)
    out = tmp_path / "global"
    aggregate_adapters([str(c) for c in clients], out, strategy="fedex-svd", weights=WEIGHTS,
                       rank=4)
    folded = tmp_path / "folded"
    fold_base(base, out / RESIDUAL_FILE, folded)
    result = merged_state(folded, out, auto)
    states = [merged_state(base, c, auto) for c in clients]
    mean = weighted_mean_state(states, WEIGHTS)
    plain = auto.from_pretrained(base, dtype=torch.float32).state_dict()
    changed = [k for k in mean if any(not torch.equal(s[k], plain[k]) for s in states)]
    assert changed, "the clients changed nothing"
    for key in mean:
        err = float((result[key].double() - mean[key]).norm() / max(mean[key].norm(), 1e-30))
        assert err <= 1e-5, f"{case.name}: {key} off by {err:.2e}"
    tokens = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    expected = logits_of(base, mean, tokens, auto)
    got = logits_of(folded, result, tokens, auto)
    assert float((got - expected).norm() / expected.norm()) <= 1e-5


def test_a_square_conv1d_residual_is_placed_transposed_not_silently_wrong(tmp_path):
    """0.1 added D untransposed into GPT-2's square attn.c_proj (768x768 in real GPT-2): no
    error, 86% off. Now the orientation comes from the model (and the residual's record)."""
    case = CASES[1]
    base = tmp_path / "base"
    make_base(case, base)
    clients = [tmp_path / f"c{k}" for k in range(2)]
    for k, folder in enumerate(clients):
        make_client(case, base, folder, k)
    out = tmp_path / "global"
    aggregate_adapters([str(c) for c in clients], out, strategy="fedex-svd", rank=2)
    # A bare weights file with no config beside it: only the residual's record can tell.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    fold_base(lone / "model.safetensors", out / RESIDUAL_FILE, tmp_path / "f.safetensors")
    from safetensors.torch import load_file, save_file

    folded, plain = load_file(str(tmp_path / "f.safetensors")), load_file(
        str(base / "model.safetensors"))
    key = "transformer.h.0.attn.c_proj.weight"
    with torch.no_grad():
        model = auto_class().from_pretrained(base, dtype=torch.float32)
        fold_into_model(model, out / RESIDUAL_FILE)
    assert torch.allclose(folded[key], model.state_dict()[key], atol=1e-6)
    assert not torch.allclose(folded[key], plain[key])
    # Without any record (a hand-made residual), a square weight is refused, naming it.
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(out / RESIDUAL_FILE)), str(stripped))
    with pytest.raises(AdapterError, match="square.*Conv1D"):
        fold_base(lone / "model.safetensors", stripped, tmp_path / "g.safetensors")


def test_a_tied_lm_head_target_is_refused_with_the_reason(tmp_path):
    from chorus_p2p.lora.residual import FactoredResidual

    model = auto_class().from_config(llama(tie_word_embeddings=True))
    residual = FactoredResidual({"base_model.model.lm_head": (torch.randn(96, 2),
                                                              torch.randn(2, 64))})
    with pytest.raises(AdapterError, match="tie_word_embeddings"):
        fold_into_model(model, residual)


def test_dora_and_lora_bias_are_refused_naming_the_option(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    make_base(CASES[0], base)
    for option, said in ((dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias")):
        model = auto_class().from_pretrained(base, dtype=torch.float32)
        folder = tmp_path / next(iter(option))
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], **option)
                       ).save_pretrained(folder)
        with pytest.raises(AdapterError, match=said):
            aggregate_adapters([str(folder), str(folder)], tmp_path / f"out-{said}")


# -- the node federates them too --------------------------------------------------------------
NODE_CASES = [
    (CASES[1], dict(target_modules=("c_attn", "c_proj", "c_fc"))),
    (CASES[3], dict(target_modules=("q_proj", "v_proj"), task_type="SEQ_CLS",
                    modules_to_save=("score",))),
]


@pytest.mark.parametrize("case,options", NODE_CASES, ids=["gpt2", "llama-classifier"])
async def test_a_node_federates_it_and_exports_a_plain_transformers_model(tmp_path, case,
                                                                          options):
    import asyncio

    from chorus_p2p.client import AsyncNodeClient
    from chorus_p2p.node.export import export_from_data_dir

    from nodeutil import start_node, wait_for

    base = tmp_path / "base"
    make_base(case, base)
    auto = auto_class(case.task_type)
    node = await start_node(tmp_path / "node", base, rank=4, alpha=8.0, min_updates=3,
                            **options)
    try:
        clients = []
        for k in range(3):  # the federation's rank and alpha; each client its own data
            folder = tmp_path / f"client{k}"
            make_client(case, base, folder, k, options=dict(r=4, lora_alpha=8))
            async with AsyncNodeClient(node.url, secret=node.identity.secret,
                                       client_id=f"c{k}") as c:
                await c.submit(folder, examples=WEIGHTS[k])
            clients.append(folder)
        await wait_for(lambda: node.ledger.round(1)["state"] == "committed", timeout=30)
        await node.state.reader(1)
        out, number = await asyncio.to_thread(export_from_data_dir, tmp_path / "node",
                                              tmp_path / "export")
        assert number == 1
        exported = auto.from_pretrained(out, dtype=torch.float32)  # no PEFT, no chorus-p2p
        states = [merged_state(base, c, auto) for c in clients]
        mean = weighted_mean_state(states, WEIGHTS)
        tokens = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(3))
        expected = logits_of(base, mean, tokens, auto)
        with torch.no_grad():
            got = exported(tokens).logits.double()
        assert float((got - expected).norm() / expected.norm()) <= 1e-5
    finally:
        await node.stop()
