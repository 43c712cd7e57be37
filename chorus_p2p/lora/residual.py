"""Residual files: a round's factored ``D`` and a node's dense cumulative ``R``.

Two formats, both safetensors, told apart by their keys:

- **factored** (``residual.safetensors``, one round's ``D``): for each module with PEFT key
  prefix ``P``, float32 ``P.residual_left`` (d_out x k) and ``P.residual_right`` (k x d_in), with
  ``D = residual_left @ residual_right``. Metadata ``format = chorus-residual``. This is what the
  replicated log stores and what ``aggregate`` writes: it stays small (rank <= K - r).
- **dense** (``format = chorus-state``, a node's ``R`` after some round): ``P.residual``, float32
  d_out x d_in. ``R`` is the sum of every round's ``D``; its rank only grows, so it is kept dense
  (see :mod:`chorus_p2p.state`).

:class:`ResidualFile` opens either lazily and hands out one module at a time, so folding a dense
``R`` for a large model never holds more than one module in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.config import module_name_from_prefix

LEFT_SUFFIX = ".residual_left"
RIGHT_SUFFIX = ".residual_right"
DENSE_SUFFIX = ".residual"
RESIDUAL_FILE = "residual.safetensors"
RESIDUAL_METADATA = {"format": "chorus-residual", "version": "1"}


@dataclass
class FactoredResidual:
    """Per-module ``(left, right)`` pairs, keyed by PEFT prefix (tests and tools build these)."""

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


class ResidualFile:
    """A factored or dense residual file, validated as each module is read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.label = str(path)
        if not self.path.is_file():
            raise AdapterError("no such residual file", source=self.label)
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(self._handle.keys())
        except Exception as exc:
            raise AdapterError(f"not a valid safetensors file ({exc})", source=self.label) from exc
        self.dense = bool(keys) and all(k.endswith(DENSE_SUFFIX) for k in keys)
        self.modules: dict[str, tuple[int, int]] = {}
        self.metadata = self._handle.metadata() or {}
        if self.dense:
            for key in keys:
                shape = list(self._handle.get_slice(key).get_shape())
                prefix = key[: -len(DENSE_SUFFIX)]
                if len(shape) != 2:
                    raise AdapterError(f"dense residual has shape {shape}", source=self.label,
                                       module=module_name_from_prefix(prefix))
                self.modules[prefix] = (shape[0], shape[1])
            return
        pairs: dict[str, dict[str, list[int]]] = {}
        for key in keys:
            for suffix in (LEFT_SUFFIX, RIGHT_SUFFIX):
                if key.endswith(suffix):
                    pairs.setdefault(key[: -len(suffix)], {})[suffix] = list(
                        self._handle.get_slice(key).get_shape())
                    break
            else:
                raise AdapterError(f"key {key!r} is not a residual factor", source=self.label)
        for prefix, shapes in pairs.items():
            module = module_name_from_prefix(prefix)
            if len(shapes) != 2:
                raise AdapterError("residual_left/residual_right are unpaired", source=self.label,
                                   module=module)
            left, right = shapes[LEFT_SUFFIX], shapes[RIGHT_SUFFIX]
            if len(left) != 2 or len(right) != 2 or left[1] != right[0]:
                raise AdapterError(f"factor shapes {left} @ {right} do not chain",
                                   source=self.label, module=module)
            self.modules[prefix] = (left[0], right[1])

    @property
    def transposed(self) -> dict[str, bool | None]:
        """Per module: is ``D`` stored transposed in the base weight (``Conv1D``, embedding)?
        None where the file does not say (``fold`` then needs the weight's shape to tell)."""
        meta = self.metadata
        if "transposed" in meta:  # a node's state: its spec knows every module's layer type
            flagged = set(json.loads(meta["transposed"]))
            return {p: p in flagged for p in self.modules}
        embeddings = set(json.loads(meta.get("embedding_modules", "[]")))
        fan = {"true": True, "false": False}.get(meta.get("fan_in_fan_out", ""))
        return {p: True if p in embeddings else fan for p in self.modules}

    def __enter__(self) -> "ResidualFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle = None

    def _tensor(self, key: str, module: str) -> torch.Tensor:
        try:
            tensor = self._handle.get_tensor(key).to(torch.float32)
        except Exception as exc:
            raise AdapterError(f"cannot read {key.rsplit('.', 1)[-1]} ({exc})", source=self.label,
                               module=module) from exc
        if not torch.isfinite(tensor).all():
            raise AdapterError("residual contains NaN or Inf", source=self.label, module=module)
        return tensor

    def factors(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` of a factored file."""
        if self.dense:
            raise AdapterError("is a dense state file, not a factored residual", source=self.label)
        module = module_name_from_prefix(prefix)
        return (self._tensor(prefix + LEFT_SUFFIX, module),
                self._tensor(prefix + RIGHT_SUFFIX, module))

    def delta(self, prefix: str) -> torch.Tensor:
        """The module's dense ``d_out x d_in`` change, float32, either format."""
        if self.dense:
            return self._tensor(prefix + DENSE_SUFFIX, module_name_from_prefix(prefix))
        left, right = self.factors(prefix)
        return left @ right

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for prefix in self.modules:
            yield prefix, self.delta(prefix)


def iter_residual_file(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(prefix, left, right)`` of a factored file one module at a time."""
    with ResidualFile(path) as residual:
        for prefix in residual.modules:
            yield (prefix, *residual.factors(prefix))


def load_residual(path: str | os.PathLike) -> FactoredResidual:
    return FactoredResidual({p: (left, right) for p, left, right in iter_residual_file(path)})
