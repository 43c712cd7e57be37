"""The part of a PEFT ``LoraConfig`` that decides each module's rank and scale.

We read ``adapter_config.json`` as plain JSON instead of through ``peft.LoraConfig`` so a client
adapter written by any PEFT version (with fields this PEFT does not know) still aggregates, and so
the fields we do not touch are written back unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

PEFT_PREFIX = "base_model.model."


def module_name_from_prefix(prefix: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (PEFT's key)."""
    return prefix[len(PEFT_PREFIX):] if prefix.startswith(PEFT_PREFIX) else prefix


def _pattern_value(patterns: Mapping[str, Any], module_name: str) -> Any | None:
    """Resolve a rank/alpha pattern exactly as PEFT's ``get_pattern_key`` does (first match wins)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return None


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraSettings:
    """Rank and alpha rules of one adapter; ``raw`` keeps every other field for round-tripping."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    fixed_scale: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LoraSettings":
        peft_type = str(data.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ValueError(f"peft_type is {peft_type!r}; only LORA adapters can be aggregated")
        if data.get("use_dora"):
            raise ValueError("DoRA adapters (use_dora=true) are not supported: their magnitude "
                             "vector does not average linearly")
        r = int(data.get("r", 8))
        alpha = float(data.get("lora_alpha", r))
        if r <= 0 or not math.isfinite(alpha):
            raise ValueError(f"invalid r={r} / lora_alpha={alpha}")
        return cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern={str(k): int(v) for k, v in (data.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
            raw=dict(data),
        )

    @classmethod
    def unit_scale(cls, r: int) -> "LoraSettings":
        """Settings for a bare ``.safetensors`` with no config: every module has scale 1.

        A bare file cannot say what ``lora_alpha`` it was trained with, so we take its factors at
        face value (``delta W = B @ A``) rather than guess a PEFT default.
        """
        return cls(r=r, lora_alpha=float(r), fixed_scale=1.0,
                   raw={"peft_type": "LORA", "r": r, "lora_alpha": r})

    def rank_for(self, module_name: str) -> int:
        value = _pattern_value(self.rank_pattern, module_name)
        return int(value) if value is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        value = _pattern_value(self.alpha_pattern, module_name)
        return float(value) if value is not None else self.lora_alpha

    def scale_for(self, module_name: str, rank: int) -> float:
        """Scale of a module whose factors have ``rank`` columns (the tensor shape is the truth)."""
        if self.fixed_scale is not None:
            return self.fixed_scale
        return lora_scale(self.alpha_for(module_name), rank, self.use_rslora)
