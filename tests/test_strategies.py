"""Every strategy against a float64 dense reference, on hypothesis-generated problems."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_p2p.lora.adapter_io import LoraFactors
from chorus_p2p.lora.lowrank import thin_svd_of_product
from chorus_p2p.lora.strategies import aggregate_module


@st.composite
def problems(draw):
    d_out = draw(st.integers(1, 24))
    d_in = draw(st.integers(1, 24))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for _ in range(n):
        r = draw(st.integers(1, 6))
        scale = draw(st.floats(0.05, 8.0))
        clients.append(LoraFactors(A=torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                                   B=torch.randn(d_out, r, generator=gen, dtype=torch.float64),
                                   scale=scale))
    raw = [draw(st.floats(0.1, 1000.0)) for _ in range(n)]
    weights = [w / sum(raw) for w in raw]
    out_rank = draw(st.integers(1, 8))
    out_scale = draw(st.floats(0.1, 4.0))
    return clients, weights, out_rank, out_scale


def dense_target(clients, weights) -> torch.Tensor:
    return sum(w * c.scale * (c.B.double() @ c.A.double()) for c, w in zip(clients, weights))


def reconstruct(result) -> torch.Tensor:
    total = result.scale * (result.B.double() @ result.A.double())
    if result.residual_left is not None:
        total = total + result.residual_left.double() @ result.residual_right.double()
    return total


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else float((a - b).norm())


@settings(max_examples=60, deadline=None)
@given(problems())
def test_fedex_svd_is_exact_and_optimal(problem):
    clients, weights, rank, scale = problem
    M = dense_target(clients, weights)
    result = aggregate_module(clients, weights, "fedex-svd", rank, scale)
    assert result.A.shape == (rank, M.shape[1]) and result.B.shape == (M.shape[0], rank)
    assert rel(reconstruct(result), M) < 1e-10
    # Eckart-Young: the adapter is the best rank-r approximation of M.
    s = torch.linalg.svdvals(M)
    best_tail = float(torch.sqrt((s[rank:] ** 2).sum()))
    adapter_error = float((M - result.scale * result.B @ result.A).norm())
    assert adapter_error == pytest.approx(best_tail, rel=1e-7, abs=1e-9 * float(s[0]) + 1e-12)
    # The residual is factored with at most K - r columns.
    K = sum(c.rank for c in clients)
    assert result.residual_rank <= max(K - rank, 0)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_fedex_is_averaged_factors_plus_exact_residual(problem):
    clients, weights, _, scale = problem
    rank = max(c.rank for c in clients)
    M = dense_target(clients, weights)
    result = aggregate_module(clients, weights, "fedex", rank, scale)
    assert rel(reconstruct(result), M) < 1e-10
    # The adapter itself is FedAvg of the (scale-corrected, zero-padded) factors.
    avg = aggregate_module(clients, weights, "fedavg", rank, scale)
    assert torch.allclose(result.A, avg.A) and torch.allclose(result.B, avg.B)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_fedavg_matches_dense_reference(problem):
    clients, weights, _, scale = problem
    rank = max(c.rank for c in clients)
    d_out, d_in = clients[0].B.shape[0], clients[0].A.shape[1]
    A_ref = torch.zeros(rank, d_in, dtype=torch.float64)
    B_ref = torch.zeros(d_out, rank, dtype=torch.float64)
    for c, w in zip(clients, weights):
        A_ref[: c.rank] += w * c.A
        B_ref[:, : c.rank] += w * c.scale / scale * c.B
    result = aggregate_module(clients, weights, "fedavg", rank, scale)
    assert torch.allclose(result.A, A_ref, atol=1e-12) and torch.allclose(result.B, B_ref, atol=1e-12)
    assert result.residual_left is None


@pytest.mark.parametrize("strategy", ["fedex-svd", "fedex"])
def test_float32_error_against_float64_reference(strategy):
    gen = torch.Generator().manual_seed(3)
    clients = [LoraFactors(A=torch.randn(16, 768, generator=gen) * 0.02,
                           B=torch.randn(512, 16, generator=gen) * 0.02, scale=2.0)
               for _ in range(10)]
    weights = [i + 1.0 for i in range(10)]
    weights = [w / sum(weights) for w in weights]
    M = dense_target(clients, weights)
    result = aggregate_module(clients, weights, strategy, 16, 2.0)
    assert result.A.dtype == torch.float32
    assert rel(reconstruct(result), M) <= 1e-5


def test_identical_clients_leave_no_residual():
    gen = torch.Generator().manual_seed(1)
    one = LoraFactors(A=torch.randn(4, 32, generator=gen), B=torch.randn(16, 4, generator=gen), scale=1.0)
    for strategy in ("fedex", "fedex-svd"):
        result = aggregate_module([one, one, one], [0.2, 0.3, 0.5], strategy, 4, 1.0)
        assert result.residual_rank == 0, strategy
        assert result.residual_norm == pytest.approx(0.0, abs=1e-4 * result.target_norm)


def test_low_rank_route_never_forms_the_dense_matrix():
    """A 200k x 200k layer would need 160 GB dense; the factored route needs a few MB."""
    gen = torch.Generator().manual_seed(0)
    d = 200_000
    clients = [LoraFactors(A=torch.randn(4, d, generator=gen), B=torch.randn(d, 4, generator=gen),
                           scale=1.0) for _ in range(3)]
    result = aggregate_module(clients, [1 / 3] * 3, "fedex-svd", 4, 1.0)
    assert result.residual_rank == 8
    # Check the identity on a random probe instead of densely: (sBA + D) x == M x.
    x = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    expected = sum(c.B.double() @ (c.A.double() @ x) for c in clients) / 3
    got = result.B.double() @ (result.A.double() @ x) + \
        result.residual_left.double() @ (result.residual_right.double() @ x)
    assert rel(got, expected) <= 1e-5


def test_thin_svd_of_product_matches_dense_svd():
    gen = torch.Generator().manual_seed(5)
    left = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    right = torch.randn(7, 30, generator=gen, dtype=torch.float64)
    svd = thin_svd_of_product(left, right)
    assert torch.allclose(svd.S, torch.linalg.svdvals(left @ right)[:7], rtol=1e-10)
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, left @ right, atol=1e-10)
    assert svd.numerical_rank() == 7


def test_residual_energy_is_tail_over_total():
    gen = torch.Generator().manual_seed(9)
    clients = [LoraFactors(A=torch.randn(3, 20, generator=gen, dtype=torch.float64),
                           B=torch.randn(10, 3, generator=gen, dtype=torch.float64), scale=1.0)
               for _ in range(2)]
    result = aggregate_module(clients, [0.5, 0.5], "fedex-svd", 3, 1.0)
    s = torch.linalg.svdvals(dense_target(clients, [0.5, 0.5]))
    assert result.target_norm == pytest.approx(float(s.norm()), rel=1e-9)
    assert result.residual_norm == pytest.approx(float(s[3:].norm()), rel=1e-9)
    assert math.isnan(aggregate_module(clients, [0.5, 0.5], "fedavg", 3, 1.0).residual_norm)
