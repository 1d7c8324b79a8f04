"""APJN depth profiles and their standard errors against the dense Jacobian, on demo-model blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from thetascope.demo.model import Block, GPTConfig
from thetascope.functional.apjn import (
    apjn_profile,
    apjn_with_stderr,
    averaged_partial_jacobian_norm_exact,
)


def _standard_init(m: nn.Module) -> None:
    # O(1) weights (variance 1/fan_in) so the residual branches matter and the Jacobian is far from identity
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, 1.0 / math.sqrt(mod.in_features))
            nn.init.normal_(mod.bias, 0.0, 0.1)


@pytest.mark.parametrize("norm", ["pre", "post", "dyt", "derf"])
@pytest.mark.parametrize("causal", [True, False])
def test_profile_matches_dense_jacobian_within_reported_stderr(norm: str, causal: bool) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=3, n_embd=8, n_head=2, block_size=4, norm=norm, causal=causal)  # type: ignore[arg-type]
    blocks = nn.Sequential(*[Block(cfg) for _ in range(3)]).double()
    _standard_init(blocks)
    h0 = torch.randn(2, 4, 8, dtype=torch.float64) * 2

    x = h0.clone().requires_grad_(True)
    outs, h = [], x
    for b in blocks:
        h = b(h)
        outs.append(h)
    est, se = apjn_profile(outs, x, n_probes=48, generator=torch.Generator().manual_seed(3))
    assert est.shape == se.shape == (3,)
    assert est.dtype == torch.float64
    for depth in range(1, 4):
        exact = float(averaged_partial_jacobian_norm_exact(blocks[:depth], h0))
        e, s = float(est[depth - 1]), float(se[depth - 1])
        assert 0 < s < 0.25 * exact, (depth, s, exact)  # a real, non-vacuous error bar
        assert abs(e - exact) <= 4 * s, (depth, e, exact, s)


def test_reported_stderr_matches_the_rademacher_variance() -> None:
    # Var ||J^T w||^2 = 2 sum_{i != j} (J J^T)_ij^2 for Rademacher w; the reported SE estimates its root
    torch.manual_seed(1)
    lin = nn.Linear(6, 5).double()
    h0 = torch.randn(1, 6, dtype=torch.float64)
    jac = lin.weight.detach()
    gram = jac @ jac.T
    sd = math.sqrt(float(2 * (gram.square().sum() - gram.diagonal().square().sum()))) / 5
    _, se = apjn_with_stderr(lin, h0, n_probes=400, generator=torch.Generator().manual_seed(0))
    assert float(se) == pytest.approx(sd / math.sqrt(400), rel=0.15)


def test_profile_edge_cases_and_validation() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    const = torch.ones(4)  # does not depend on x
    est, se = apjn_profile([const, x * 1.0], x, n_probes=2)
    assert est.tolist() == [0.0, 1.0]
    assert se.tolist() == [0.0, 0.0]
    assert apjn_profile([], x, n_probes=2)[0].numel() == 0
    with pytest.raises(ValueError, match="n_probes"):
        apjn_profile([x * 2.0], x, n_probes=1)
    with pytest.raises(ValueError, match="require grad"):
        apjn_profile([x * 2.0], torch.randn(3, 2), n_probes=2)
    with pytest.raises(ValueError, match="floating"):
        apjn_with_stderr(lambda h: h, torch.ones(2, dtype=torch.long), n_probes=2)
