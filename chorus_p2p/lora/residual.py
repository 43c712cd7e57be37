"""Factored residuals: the part of the exact mean that a rank-r adapter cannot hold.

File format (``residual.safetensors``): for each target module with PEFT key prefix ``P``, two
float32 tensors ``P.residual_left`` (d_out x k) and ``P.residual_right`` (k x d_in), with
``D = residual_left @ residual_right``. Metadata ``format = chorus-residual``.

The cumulative residual ``R`` that a node keeps beside its base weights uses the same format; each
round's ``D`` is appended and the pair recompressed to its numerical rank, so ``R`` never grows
past ``min(d_out, d_in)`` columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.config import module_name_from_prefix
from chorus_p2p.lora.lowrank import frobenius_norm_of_product, thin_svd_of_product

LEFT_SUFFIX = ".residual_left"
RIGHT_SUFFIX = ".residual_right"
RESIDUAL_FILE = "residual.safetensors"
RESIDUAL_METADATA = {"format": "chorus-residual", "version": "1"}


@dataclass
class FactoredResidual:
    """Per-module ``(left, right)`` pairs, keyed by PEFT prefix."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, (left, right) in self.factors.items():
            out[prefix + LEFT_SUFFIX] = left.to(torch.float32).contiguous()
            out[prefix + RIGHT_SUFFIX] = right.to(torch.float32).contiguous()
        return out

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        save_file(self.tensors(), str(path), metadata={**RESIDUAL_METADATA, **(metadata or {})})

    def dense(self, prefix: str) -> torch.Tensor:
        left, right = self.factors[prefix]
        return left.double() @ right.double()

    def add(self, other: "FactoredResidual") -> None:
        """``self += other``, module by module, recompressed so the rank stays minimal."""
        for prefix, (left, right) in other.factors.items():
            if prefix not in self.factors:
                self.factors[prefix] = (left.to(torch.float32), right.to(torch.float32))
                continue
            mine_left, mine_right = self.factors[prefix]
            if mine_left.shape[0] != left.shape[0] or mine_right.shape[1] != right.shape[1]:
                raise AdapterError(
                    f"residual is {left.shape[0]}x{right.shape[1]} but R is "
                    f"{mine_left.shape[0]}x{mine_right.shape[1]}", module=module_name_from_prefix(prefix))
            self.factors[prefix] = recompress(torch.cat([mine_left, left.float()], dim=1),
                                              torch.cat([mine_right, right.float()], dim=0))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.factors.values() for t in pair)


def recompress(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with the fewest columns (exact to round-off)."""
    svd = thin_svd_of_product(left, right)
    rank = svd.numerical_rank(frobenius_norm_of_product(left, right))
    return svd.balanced_factors(0, rank)


def iter_residual_file(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(prefix, left, right)`` one module at a time, validating as it goes."""
    label = str(path)
    if not Path(path).is_file():
        raise AdapterError("no such residual file", source=label)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as exc:
        raise AdapterError(f"not a valid safetensors file ({exc})", source=label) from exc
    prefixes: dict[str, set[str]] = {}
    for key in keys:
        for suffix in (LEFT_SUFFIX, RIGHT_SUFFIX):
            if key.endswith(suffix):
                prefixes.setdefault(key[: -len(suffix)], set()).add(suffix)
                break
        else:
            raise AdapterError(f"key {key!r} is not a residual factor", source=label)
    for prefix, suffixes in prefixes.items():
        module = module_name_from_prefix(prefix)
        if len(suffixes) != 2:
            raise AdapterError("residual_left/residual_right are unpaired", source=label, module=module)
        try:
            left = handle.get_tensor(prefix + LEFT_SUFFIX).to(torch.float32)
            right = handle.get_tensor(prefix + RIGHT_SUFFIX).to(torch.float32)
        except Exception as exc:
            raise AdapterError(f"cannot read factors ({exc})", source=label, module=module) from exc
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
            raise AdapterError(f"factor shapes {list(left.shape)} @ {list(right.shape)} do not chain",
                               source=label, module=module)
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise AdapterError("residual contains NaN or Inf", source=label, module=module)
        yield prefix, left, right


def load_residual(path: str | os.PathLike) -> FactoredResidual:
    return FactoredResidual({p: (left, right) for p, left, right in iter_residual_file(path)})
