"""Aggregation strategies for one target module.

Notation (``../shared/design.md`` section 1): client ``i`` sends ``(B_i, A_i)`` with scale ``s_i``
and normalised weight ``w_i``. The exact target is ``M = sum_i w_i s_i B_i @ A_i``. Every exact
strategy returns a new adapter ``(B', A')`` with scale ``s`` and a factored residual
``D = left @ right`` such that ``s B' A' + D == M`` to round-off; ``fedavg`` returns no residual
and is inexact (a baseline).

Nothing here forms a ``d_out x d_in`` matrix: see :mod:`chorus_p2p.lora.lowrank`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from chorus_p2p.lora.adapter_io import LoraFactors
from chorus_p2p.lora.names import DEFAULT_STRATEGY, STRATEGIES
from chorus_p2p.lora.lowrank import ThinSVD, frobenius_norm_of_product, thin_svd_of_product



@dataclass(frozen=True)
class ModuleAggregate:
    """The result for one module."""

    A: torch.Tensor  # r_out x d_in
    B: torch.Tensor  # d_out x r_out
    scale: float
    residual_left: torch.Tensor | None  # d_out x k
    residual_right: torch.Tensor | None  # k x d_in
    target_norm: float  # ||M||_F
    residual_norm: float  # ||D||_F (0 for an exact fit, NaN when not computed)

    @property
    def residual_rank(self) -> int:
        return 0 if self.residual_left is None else int(self.residual_left.shape[1])


def stacked_factors(clients: Sequence[LoraFactors], weights: Sequence[float]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = Bc @ Ac`` with ``Bc = [w_1 s_1 B_1 | ...]`` and ``Ac = [A_1; ...]`` (K = sum r_i)."""
    left = torch.cat([c.B * (w * c.scale) for c, w in zip(clients, weights)], dim=1)
    right = torch.cat([c.A for c in clients], dim=0)
    return left, right


def _pad_rank(factors: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a lower-rank client to ``rank``; the product ``B @ A`` is unchanged."""
    extra = rank - factors.rank
    if extra == 0:
        return factors.A, factors.B
    A = torch.cat([factors.A, factors.A.new_zeros(extra, factors.A.shape[1])], dim=0)
    B = torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], dim=1)
    return A, B


def averaged_factors(clients: Sequence[LoraFactors], weights: Sequence[float], rank: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg of the factors. Each ``B_i`` is rescaled by ``s_i / s`` so clients trained with a
    different ``lora_alpha`` contribute the update they actually applied."""
    A = torch.zeros(rank, clients[0].A.shape[1], dtype=clients[0].A.dtype)
    B = torch.zeros(clients[0].B.shape[0], rank, dtype=clients[0].B.dtype)
    for client, w in zip(clients, weights):
        A_i, B_i = _pad_rank(client, rank)
        A += w * A_i
        B += (w * client.scale / scale) * B_i
    return A, B


def _split_like_clients(svd: ThinSVD, kept: int, scale: float, clients: Sequence[LoraFactors],
                        weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the top-``kept`` SVD of M into ``(B', A')`` with ``s B' A'`` equal to it.

    Any split is exact; this one gives ``A'`` orthogonal rows at the clients' own row scale
    (their weighted RMS row norm) and puts the singular values in ``B'``. That is how LoRA itself
    starts (``A`` at its init scale, ``B`` carrying the update), so the next round trains as
    fast as the last; a balanced ``sqrt(S)`` split shrinks both factors when ``M`` is small, and
    with them both gradients (dL/dB ~ A, dL/dA ~ B).
    """
    row_scale = sum(w * float(torch.linalg.vector_norm(c.A)) / c.rank ** 0.5
                    for c, w in zip(clients, weights))
    if not row_scale > 0:
        return svd.balanced_factors(0, kept, scale=scale)
    A = row_scale * svd.Vh[:kept]
    B = svd.U[:, :kept] * (svd.S[:kept] / (scale * row_scale))
    return B, A


def _residual_from_svd(svd: ThinSVD, start: int, reference: float
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    stop = svd.numerical_rank(reference)
    if stop <= start:
        return None, None
    return svd.balanced_factors(start, stop)


def aggregate_module(clients: Sequence[LoraFactors], weights: Sequence[float], strategy: str,
                     rank: int, scale: float) -> ModuleAggregate:
    """Aggregate one module's client factors into a rank-``rank`` adapter of scale ``scale``.

    ``weights`` must already be normalised to sum to one.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    left, right = stacked_factors(clients, weights)

    if strategy == "fedex-svd":
        svd = thin_svd_of_product(left, right)
        target_norm = float(torch.linalg.vector_norm(svd.S))
        # Directions below round-off are not part of M: leave those adapter columns zero.
        kept = min(rank, svd.numerical_rank(target_norm))
        B_top, A_top = _split_like_clients(svd, kept, scale, clients, weights)
        A = torch.zeros(rank, right.shape[1], dtype=right.dtype)
        B = torch.zeros(left.shape[0], rank, dtype=left.dtype)
        A[:kept], B[:, :kept] = A_top, B_top
        res_left, res_right = _residual_from_svd(svd, kept, target_norm)
        residual_norm = float(torch.linalg.vector_norm(svd.S[kept:svd.numerical_rank(target_norm)]))
        return ModuleAggregate(A, B, scale, res_left, res_right, target_norm, residual_norm)

    A, B = averaged_factors(clients, weights, rank, scale)
    target_norm = frobenius_norm_of_product(left, right)
    if strategy == "fedavg":
        return ModuleAggregate(A, B, scale, None, None, target_norm, float("nan"))

    # fedex: D = M - s B' A' = [Bc | -s B'] @ [Ac ; A'], recompressed to its true rank.
    svd = thin_svd_of_product(torch.cat([left, -scale * B], dim=1), torch.cat([right, A], dim=0))
    res_left, res_right = _residual_from_svd(svd, 0, target_norm)
    residual_norm = float(torch.linalg.vector_norm(svd.S[:svd.numerical_rank(target_norm)]))
    return ModuleAggregate(A, B, scale, res_left, res_right, target_norm, residual_norm)
