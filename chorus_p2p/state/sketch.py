"""State sketches: how nodes prove they hold the same ``R`` without shipping it.

For each module, fixed random sign vectors ``U`` (d_out x 4) and ``V`` (d_in x 4), derived from
the federation name and the module's prefix with SHAKE-256 (so they are the same on every machine
and every library version), give a 4 x 4 fingerprint ``U^T R V`` in float64.

It is linear in ``R``, so the coordinator extends it every round from the round's factored
residual alone, ``sketch_t = sketch_{t-1} + (U^T L)(Rt V)``, at no real cost, and records it in the
round (the replicated log). Each node computes the fingerprint of its own dense state and
compares: every module on checkpoint rounds, at start-up and for a fetched checkpoint, one module
in rotation on the rounds between. For random signs, ``E|u^T E v|^2 = ||E||_F^2``: any error in a
node's state shows with the size of its Frobenius norm, while float32 round-off (~1e-6 of
``||R||`` after hundreds of rounds) stays far below the tolerance (1e-4 of the module's scale).
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

PROBES = 4
MATCH_RTOL = 1e-4

Sketch = dict[str, torch.Tensor]  # prefix -> PROBES x PROBES float64


def _signs(seed: str, count: int) -> torch.Tensor:
    raw = hashlib.shake_256(seed.encode()).digest((count + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:count]
    return torch.from_numpy(bits.astype(np.float64) * 2.0 - 1.0)


class Probes:
    """The sign vectors of one federation, made on first use per module."""

    def __init__(self, federation: str, modules: Mapping[str, tuple[int, int]]):
        self.federation = federation
        self.modules = dict(sorted(modules.items()))
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cast: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def pair(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prefix not in self._cache:
            d_out, d_in = self.modules[prefix]
            base = f"chorus-p2p/sketch/{self.federation}/{prefix}"
            self._cache[prefix] = (_signs(base + "/U", d_out * PROBES).reshape(d_out, PROBES),
                                   _signs(base + "/V", d_in * PROBES).reshape(d_in, PROBES))
        return self._cache[prefix]

    def zero(self) -> Sketch:
        return {p: torch.zeros(PROBES, PROBES, dtype=torch.float64) for p in self.modules}

    def of_factors(self, prefix: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``U^T (left @ right) V`` without forming the product."""
        u, v = self.pair(prefix)
        return (u.T @ left.double()) @ (right.double() @ v)

    def of_dense(self, prefix: str, dense: torch.Tensor) -> torch.Tensor:
        """``U^T R V`` from a float32 ``R``. ``R V`` is summed in float32 (the signs are exact;
        the sum's rounding, ~sqrt(d_in) * 6e-8 of ``||R||``, is far inside the tolerance), the
        rest in float64: one pass over the module, no float64 copy of it."""
        u, v = self.pair(prefix)
        if (prefix, dense.dtype) not in self._cast:
            self._cast[(prefix, dense.dtype)] = v.to(dense.dtype)
        return u.T @ (dense @ self._cast[(prefix, dense.dtype)]).double()


def add(a: Sketch, b: Mapping[str, torch.Tensor]) -> Sketch:
    return {p: a[p] + b[p] if p in b else a[p] for p in a}


def encode(sketch: Sketch) -> str:
    """Compact text for the ledger: base64 of the float64 values in sorted prefix order."""
    values = torch.cat([sketch[p].reshape(-1) for p in sorted(sketch)]).numpy()
    return base64.b64encode(values.astype("<f8").tobytes()).decode()


def decode(text: str, modules: Mapping[str, tuple[int, int]]) -> Sketch:
    values = np.frombuffer(base64.b64decode(text), dtype="<f8")
    order = sorted(modules)
    if values.size != len(order) * PROBES * PROBES:
        raise ValueError(f"sketch holds {values.size} values, expected "
                         f"{len(order) * PROBES * PROBES}")
    chunks = torch.from_numpy(values.copy()).reshape(len(order), PROBES, PROBES)
    return {p: chunks[i] for i, p in enumerate(order)}


@dataclass
class Mismatch:
    prefix: str
    relative_error: float


def compare(actual: Sketch, expected: Sketch, rtol: float = MATCH_RTOL) -> list[Mismatch]:
    """Modules whose fingerprints differ by more than ``rtol`` of the module's scale.

    The scale is the fingerprint's RMS, an unbiased estimate of ``||R||_F``."""
    bad = []
    for prefix, want in expected.items():
        got = actual.get(prefix)
        if got is None:
            bad.append(Mismatch(prefix, math.inf))
            continue
        scale = float(want.pow(2).mean().sqrt())
        err = float((got - want).abs().max())
        if not math.isfinite(err) or err > rtol * max(scale, 1e-30):
            bad.append(Mismatch(prefix, err / scale if scale > 0 else math.inf))
    return bad
