"""Hutchinson APJN against the dense autograd Jacobian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from thetascope.functional.apjn import averaged_partial_jacobian_norm, averaged_partial_jacobian_norm_exact


def dense_jacobian(fn: object, h0: torch.Tensor) -> torch.Tensor:
    assert callable(fn)
    out = fn(h0)
    jac = torch.autograd.functional.jacobian(fn, h0)
    return jac.reshape(out.numel(), h0.numel()).double()


class _Block(nn.Module):
    """A small pre-LN transformer block acting on [B, L, d]."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def test_exact_matches_frobenius_of_a_linear_map() -> None:
    w = torch.randn(5, 3, dtype=torch.float64)
    h0 = torch.randn(2, 3, dtype=torch.float64)
    got = averaged_partial_jacobian_norm_exact(lambda h: h @ w.T, h0)
    # per sample the Jacobian is W; the batch mean of ||W||_F^2 / 5 is the same
    assert float(got) == pytest.approx(float(w.square().sum() / 5))


def test_hutchinson_within_its_own_standard_error_of_the_dense_value() -> None:
    torch.manual_seed(0)
    blocks = nn.Sequential(_Block(8), _Block(8)).double()
    h0 = torch.randn(2, 3, 8, dtype=torch.float64)
    exact = averaged_partial_jacobian_norm_exact(blocks, h0)
    jac = dense_jacobian(blocks, h0)
    assert float(exact) == pytest.approx(float(jac.square().sum() / jac.shape[0]), rel=1e-12)
    # variance of ||J^T w||^2 for Rademacher w: 2 * sum_{i != j} (J J^T)_ij^2
    gram = jac @ jac.T
    var = 2 * (gram.square().sum() - gram.diagonal().square().sum())
    n_probes = 64
    std_err = math.sqrt(float(var) / n_probes) / jac.shape[0]
    est = averaged_partial_jacobian_norm(
        blocks, h0, n_probes=n_probes, generator=torch.Generator().manual_seed(1)
    )
    assert abs(float(est) - float(exact)) <= 4 * std_err
    assert std_err < 0.2 * float(exact)  # the check is not vacuous
    assert est.dtype == torch.float64
    assert est.shape == ()


def test_hutchinson_is_exact_for_scaled_orthogonal_jacobians() -> None:
    q = torch.linalg.qr(torch.randn(6, 6))[0]
    est = averaged_partial_jacobian_norm(lambda h: 3.0 * h @ q.T, torch.randn(4, 6), n_probes=2)
    # J J^T = 9 I, so ||J^T w||^2 = 9 ||w||^2 = 9 * numel for every Rademacher probe: zero variance
    assert float(est) == pytest.approx(9.0, rel=1e-5)


def test_does_not_touch_parameter_grads_and_works_under_no_grad() -> None:
    block = _Block(8)
    h0 = torch.randn(1, 4, 8)
    with torch.no_grad():
        est = averaged_partial_jacobian_norm(block, h0, n_probes=2)
    assert torch.isfinite(est)
    assert not est.requires_grad
    assert all(p.grad is None for p in block.parameters())


def test_validation() -> None:
    with pytest.raises(ValueError, match="n_probes must be an int >= 1"):
        averaged_partial_jacobian_norm(lambda h: h, torch.ones(3), n_probes=0)
    with pytest.raises(ValueError, match="floating point"):
        averaged_partial_jacobian_norm(lambda h: h, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds"):
        averaged_partial_jacobian_norm_exact(lambda h: h, torch.ones(5000))
