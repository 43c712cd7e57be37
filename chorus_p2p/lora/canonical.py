"""One factorization per product: the gauge-free form of an untrusted LoRA update.

``s B A`` is unchanged by ``B G, G^-1 A`` for any invertible ``G``, so factor size says nothing
about what an update does. A hostile update uses that freedom: ``B[:, 0] = b 1e30``,
``B[:, 1] = -b 1e30`` and two equal rows of ``A`` give ``B A = 0`` exactly, so every bound on the
product passes, while the factors wreck float32 aggregation (a failed SVD, a zero global
adapter, NaN logits under fedavg). A node therefore aggregates every update in the one form its
product decides: ``s B' A' = U diag(S) Vh`` (thin SVD, computed in float64 through two thin QRs,
never densely). Then a zero product is a zero update, and the factors are as large as the
product and no larger.

How the product is split is the same convention fedex-svd uses for its output: ``A' = c Vh``
(orthonormal rows at a row scale ``c``, which the aggregation takes as the median of the clients'
own row scales, so no one client sets it) and ``B' = U diag(S) / (s c)``; LoRA trains from that
shape as from its own initialisation (``A`` at its scale, ``B`` carrying the update). Without a
row scale (the upload check) the split is balanced, ``sqrt(S / s)`` on each side. Signs are fixed
(each column of ``U`` has its largest entry positive), so two clients whose products are close
get close factors, which is what averaging factors (fedavg, fedex's adapter) needs.
"""

from __future__ import annotations

import torch

from chorus_p2p.lora.adapter_io import LoraFactors
from chorus_p2p.lora.lowrank import thin_svd_of_product


# How much larger ``||s B||_F ||A||_F`` may be than ``||s B A||_F``. Honest factors sit near
# sqrt(rank) times the conditioning of A (tens); float64 holds the product to about 1e-8
# relative at this bound. Beyond it the product is mostly rounding noise of factors that cancel.
MAX_FACTOR_CANCELLATION = 1e8


def cancellation(factors: LoraFactors, product_norm: float) -> float:
    """``||s B||_F ||A||_F / ||s B A||_F``: 1 to sqrt(rank) for balanced factors, unbounded for
    factors that cancel; 0 where a factor is zero (nothing to cancel)."""
    size = float(torch.linalg.vector_norm(factors.B.double() * factors.scale)) * \
        float(torch.linalg.vector_norm(factors.A.double()))
    if size == 0.0:
        return 0.0
    return size / product_norm if product_norm > 0 else float("inf")


def canonical_factors(factors: LoraFactors, row_scale: float | None = None
                      ) -> tuple[LoraFactors, float]:
    """The sign-fixed factorization of ``factors``' product (float64) with ``A``'s rows at
    ``row_scale`` (balanced without one), and the product's Frobenius norm ``||s B A||_F`` as
    that factorization holds it.

    The norm is read off the same SVD that makes the factors, so the bound a node checks at
    upload is a bound on exactly what it aggregates (a Gram-matrix formula can cancel to 0
    where the factors do not).
    """
    rank = factors.rank
    svd = thin_svd_of_product(factors.B.double() * factors.scale, factors.A.double())
    keep = min(rank, svd.S.numel())
    if row_scale is not None and row_scale > 0 and torch.isfinite(torch.tensor(row_scale)):
        left = svd.U[:, :keep] * (svd.S[:keep] / (factors.scale * row_scale))
        right = svd.Vh[:keep] * row_scale
    else:
        left, right = svd.balanced_factors(0, keep, factors.scale)
    # Fix each direction's sign by its largest entry in U (ties: the first such entry).
    pivot = left.abs().argmax(dim=0)
    signs = torch.sign(left[pivot, torch.arange(keep)])
    signs[signs == 0] = 1.0
    left, right = left * signs, right * signs[:, None]
    if keep < rank:  # a factor thinner than the rank (d < r): pad with zero directions
        left = torch.cat([left, left.new_zeros(left.shape[0], rank - keep)], dim=1)
        right = torch.cat([right, right.new_zeros(rank - keep, right.shape[1])], dim=0)
    norm = float(torch.linalg.vector_norm(svd.S))
    return LoraFactors(A=right, B=left, scale=factors.scale), norm
