"""SVD of a product ``L @ R`` without ever forming it.

For a layer of ``d_out x d_in`` and ``K`` stacked client ranks, a dense SVD costs
``O(d_out * d_in * min(d_out, d_in))``; QR of both thin factors plus the SVD of the small
``K x K`` core costs ``O((d_out + d_in) K^2)``. For a 3072-wide layer and ``K = 160`` that is
hundreds of times less work, and the memory is that of the factors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThinSVD:
    """``L @ R == U @ diag(S) @ Vh`` with orthonormal ``U`` columns and ``Vh`` rows, S descending."""

    U: torch.Tensor  # d_out x k
    S: torch.Tensor  # k
    Vh: torch.Tensor  # k x d_in

    def numerical_rank(self, reference: float = 0.0) -> int:
        """Count of singular values above round-off: ``max(S[0], reference) * k * eps``.

        ``k`` is the number of stacked columns, not NumPy's ``max(d_out, d_in)``: the looser NumPy
        cutoff would drop real (if tiny) directions of a 3072-wide layer and cost exactness.

        ``reference`` is the size of the quantity this matrix is a correction of: a residual that
        is zero in exact arithmetic has only noise singular values, and measuring them against
        ``||M||`` rather than against themselves keeps that noise out of the result.
        """
        if self.S.numel() == 0:
            return 0
        eps = torch.finfo(self.S.dtype).eps
        size = max(self.U.shape[1], self.Vh.shape[0], 1)
        tol = max(float(self.S[0]), reference) * size * eps
        return int((self.S > tol).sum())

    def balanced_factors(self, start: int, stop: int, scale: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split singular values ``start:stop`` evenly: ``scale * left @ right`` is that slice.

        Putting ``sqrt(S)`` on both sides keeps the two factors equally conditioned, which is
        what LoRA training from the result expects (neither factor dwarfs the other).
        """
        root = torch.sqrt(self.S[start:stop] / scale)
        left = self.U[:, start:stop] * root
        right = root[:, None] * self.Vh[start:stop]
        return left, right


def thin_svd_of_product(left: torch.Tensor, right: torch.Tensor) -> ThinSVD:
    """SVD of ``left @ right`` (``d_out x K`` times ``K x d_in``) through two thin QRs."""
    if left.shape[1] != right.shape[0]:
        raise ValueError(f"inner dimensions differ: {tuple(left.shape)} @ {tuple(right.shape)}")
    q_left, r_left = torch.linalg.qr(left, mode="reduced")  # d_out x a, a x K
    q_right, r_right = torch.linalg.qr(right.T, mode="reduced")  # d_in x b, b x K
    core = r_left @ r_right.T  # a x b, tiny
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return ThinSVD(U=q_left @ u, S=s, Vh=vh @ q_right.T)


def frobenius_norm_of_product(left: torch.Tensor, right: torch.Tensor) -> float:
    """``||left @ right||_F`` from the two ``K x K`` Gram matrices (trace identity)."""
    gram = (left.T @ left) * (right @ right.T)
    return float(torch.sqrt(torch.clamp(gram.sum(), min=0.0)))
