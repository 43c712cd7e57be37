"""Check the product's headline claim through PEFT's own loading code.

``base + folded residual + new adapter == weighted mean of the clients' merged weights``: we load
what we wrote with ``PeftModel.from_pretrained`` and ``merge_and_unload`` exactly as a user would,
so a key-naming or scaling mistake in our writer cannot hide behind our own reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


def auto_class(task_type: str | None = None):
    """The ``transformers`` auto class for a PEFT task type (causal LM unless it says else)."""
    import transformers

    return {"SEQ_CLS": transformers.AutoModelForSequenceClassification}.get(
        task_type or "CAUSAL_LM", transformers.AutoModelForCausalLM)


def merged_state(base_dir: str | Path, adapter_dir: str | Path, auto=None
                 ) -> dict[str, torch.Tensor]:
    """Load ``base_dir`` (float32), apply the PEFT adapter, merge, return the state dict."""
    from peft import PeftModel

    base = (auto or auto_class()).from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@dataclass(frozen=True)
class ExactnessReport:
    max_relative_error: float  # worst target weight, relative Frobenius, vs float64 mean
    worst_weight: str
    logits_relative_error: float


def weighted_mean_state(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
                        ) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {key: sum((w / total) * s[key].double() for s, w in zip(states, weights))
            for key in states[0]}


def compare_to_mean(result: dict[str, torch.Tensor], mean: dict[str, torch.Tensor],
                    keys: Sequence[str]) -> tuple[float, str]:
    worst, worst_key = 0.0, ""
    for key in keys:
        err = float((result[key].double() - mean[key]).norm() / mean[key].norm())
        if err >= worst:
            worst, worst_key = err, key
    return worst, worst_key


def logits_of(base_dir: str | Path, state: dict[str, torch.Tensor], tokens: torch.Tensor,
              auto=None) -> torch.Tensor:
    model = (auto or auto_class()).from_pretrained(base_dir, dtype=torch.float32)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    with torch.no_grad():
        return model(tokens).logits.double()


def check_exactness(base_dir: str | Path, client_dirs: Sequence[str | Path],
                    weights: Sequence[float], folded_base_dir: str | Path,
                    global_adapter_dir: str | Path, seed: int = 0) -> ExactnessReport:
    clients = [merged_state(base_dir, d) for d in client_dirs]
    mean = weighted_mean_state(clients, weights)
    result = merged_state(folded_base_dir, global_adapter_dir)
    base = merged_state_without_adapter(base_dir)
    targets = [k for k in mean if not torch.equal(clients[0][k], base[k])]
    worst, worst_key = compare_to_mean(result, mean, targets)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    expected = logits_of(base_dir, mean, tokens)
    got = logits_of(base_dir, result, tokens)
    logits_err = float((got - expected).norm() / expected.norm())
    return ExactnessReport(worst, worst_key, logits_err)


def merged_state_without_adapter(base_dir: str | Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
