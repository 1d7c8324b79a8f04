"""Sensitivity formulas; Theorem 5.1's bound against measured Lipschitz constants of real attention."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from thetascope.functional.sensitivity import (
    mha_lipschitz_bound,
    path_length_scale,
    projection_norm_product,
    sensitivity_proxy,
)
from thetascope.functional.spectral import head_slices


def theta_bruteforce(rows: torch.Tensor) -> torch.Tensor:
    """theta(p) = 4 max_S p(S)(1 - p(S)) by enumerating every subset (float64 reference)."""
    n = rows.shape[-1]
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)
    s = rows.double() @ masks.T
    return (4 * s * (1 - s)).amax(-1)


def attention(
    u: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    n_heads: int,
    n_kv: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain multi-head (grouped-query) attention on ``u [L, d]``; returns the output and ``A [H, L, L]``."""
    length, _ = u.shape
    dh = wq.shape[0] // n_heads
    q = (u @ wq.T).view(length, n_heads, dh).transpose(0, 1)
    k = (u @ wk.T).view(length, n_kv, dh).transpose(0, 1).repeat_interleave(n_heads // n_kv, 0)
    v = (u @ wv.T).view(length, n_kv, dh).transpose(0, 1).repeat_interleave(n_heads // n_kv, 0)
    a = torch.softmax(q @ k.mT / (tau * math.sqrt(dh)), dim=-1)
    o = (a @ v).transpose(0, 1).reshape(length, n_heads * dh)
    return o @ wo.T, a


def measured_lipschitz(fn: object, u: torch.Tensor, restarts: int = 2) -> float:
    """Largest ``max_j ||J dU||_j / max_i ||dU_i||`` at ``u`` (worst-token 2-norms in and out).

    For each output token j, alternating maximisation over per-token unit directions dU_i (each step can only
    increase the value) from several random starts: a lower estimate of the local Lipschitz constant.
    """
    assert callable(fn)
    length, d = u.shape
    jac = torch.autograd.functional.jacobian(fn, u)  # [L, d, L, d]
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for j in range(length):
        blocks = jac[j].permute(1, 0, 2)  # [L_in, d_out, d_in]
        for _ in range(restarts):
            du = torch.nn.functional.normalize(torch.randn(length, d, generator=g, dtype=u.dtype), dim=-1)
            for _ in range(25):
                y = torch.einsum("iod,id->o", blocks, du)
                y = torch.nn.functional.normalize(y, dim=0)
                du = torch.nn.functional.normalize(torch.einsum("iod,o->id", blocks, y), dim=-1)
            best = max(best, float(torch.einsum("iod,id->o", blocks, du).norm()))
    return best


def test_projection_product_and_proxy() -> None:
    q, k, v, o = (torch.tensor([1.0, 2.0]), torch.tensor(3.0), torch.tensor(0.5), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(projection_norm_product(q, k, v, o), torch.tensor([3.0, 3.0]))
    s = sensitivity_proxy(
        torch.tensor([1.0, 0.5]), torch.tensor([2.0, 4.0]), torch.tensor([3.0, 3.0]), tau=2.0
    )
    torch.testing.assert_close(s, torch.tensor([1.0 / 2 * 4 * 3, 0.5 / 2 * 16 * 3]))
    torch.testing.assert_close(
        sensitivity_proxy(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), tau=torch.tensor(4.0)),
        torch.tensor(3.0),
    )
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tau must be a finite float > 0"):
            sensitivity_proxy(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), tau=bad)


def test_bound_formula_by_hand_and_gqa_repeat() -> None:
    theta = torch.tensor([0.5, 1.0, 0.25, 0.0])
    wq = torch.tensor([1.0, 2.0, 1.0, 3.0])
    wk_kv, wv_kv = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 4.0])
    b, wo, dh, tau = torch.tensor(3.0), torch.tensor(1.5), 16, 2.0
    got = mha_lipschitz_bound(theta, b, wo, wq, wk_kv, wv_kv, head_dim=dh, tau=tau)
    wk, wv = wk_kv.repeat_interleave(2), wv_kv.repeat_interleave(2)  # query head h uses kv head h // 2
    expected = 1.5 * sum(
        float(wv[h]) + float(theta[h]) / tau * 2 * 9 / 4 * float(wq[h] * wk[h] * wv[h]) for h in range(4)
    )
    assert float(got) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(got, mha_lipschitz_bound(theta, b, wo, wq, wk, wv, head_dim=dh, tau=tau))
    # batched over layers
    batched = mha_lipschitz_bound(
        theta.expand(3, 4), b.expand(3), wo.expand(3), wq.expand(3, 4), wk, wv, dh, tau
    )
    torch.testing.assert_close(batched, got.expand(3))
    with pytest.raises(ValueError, match="w_k_h must end in H=4 heads or a divisor"):
        mha_lipschitz_bound(theta, b, wo, wq, torch.ones(3), wv, head_dim=dh)
    with pytest.raises(ValueError, match="head_dim must be an int >= 1"):
        mha_lipschitz_bound(theta, b, wo, wq, wk, wv, head_dim=0)
    with pytest.raises(ValueError, match="w_q_h must end in H=4"):
        mha_lipschitz_bound(theta, b, wo, torch.ones(2), wk, wv, head_dim=dh)


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "scale", "tau", "seed"),
    [
        (1, 1, 1.0, 1.0, 0),  # single head
        (1, 1, 3.0, 1.0, 1),  # large inputs: peaked rows, small theta
        (4, 4, 1.0, 1.0, 2),  # multi-head
        (4, 4, 2.0, 2.0, 3),  # temperature
        (4, 2, 1.5, 1.0, 4),  # grouped-query attention
    ],
)
def test_bound_is_never_exceeded_by_measured_lipschitz(
    n_heads: int, n_kv: int, scale: float, tau: float, seed: int
) -> None:
    torch.manual_seed(seed)
    length, d = 6, 16
    dh = d // n_heads
    wq, wo = torch.randn(d, d, dtype=torch.float64) / d**0.5, torch.randn(d, d, dtype=torch.float64) / d**0.5
    wk = torch.randn(n_kv * dh, d, dtype=torch.float64) / d**0.5
    wv = torch.randn(n_kv * dh, d, dtype=torch.float64) / d**0.5
    # a few trials per configuration: inputs of varied token magnitudes (block-inf/RMS geometry)
    for trial in range(2):
        u = torch.randn(length, d, dtype=torch.float64) * scale * (1 + trial)
        u[0] *= 2.0  # one larger token sets B-bar
        _, a = attention(u, wq, wk, wv, wo, n_heads, n_kv, tau)
        theta_h = theta_bruteforce(a).amax(-1)  # [H], max over rows
        b_bar = u.norm(dim=-1).max()

        def spec(w: torch.Tensor) -> torch.Tensor:
            return torch.linalg.matrix_norm(w, 2)

        bound = mha_lipschitz_bound(
            theta_h,
            b_bar,
            spec(wo),
            spec(head_slices(wq, n_heads)),
            spec(head_slices(wk, n_kv)),
            spec(head_slices(wv, n_kv)),
            head_dim=dh,
            tau=tau,
        )
        measured = measured_lipschitz(lambda x: attention(x, wq, wk, wv, wo, n_heads, n_kv, tau)[0], u)
        assert 0 < measured <= float(bound) * (1 + 1e-9), (measured, float(bound))
        # a finite (small) perturbation agrees with the local estimate
        du = torch.randn(length, d, dtype=torch.float64) * 1e-6
        diff = (
            attention(u + du, wq, wk, wv, wo, n_heads, n_kv, tau)[0]
            - attention(u, wq, wk, wv, wo, n_heads, n_kv, tau)[0]
        )
        ratio = float(diff.norm(dim=-1).max() / du.norm(dim=-1).max())
        assert ratio <= float(bound) * (1 + 1e-6)


def test_bound_is_tight_on_the_value_pathway() -> None:
    """With W_Q = 0 the attention is uniform and only the value path is left: the bound is attained."""
    torch.manual_seed(6)
    length, d = 6, 8
    wq = torch.zeros(d, d, dtype=torch.float64)
    wk, wv = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    wo = torch.eye(d, dtype=torch.float64) * 0.5
    u = torch.randn(length, d, dtype=torch.float64)
    _, a = attention(u, wq, wk, wv, wo, 1, 1, 1.0)
    spec = torch.linalg.matrix_norm
    bound = mha_lipschitz_bound(
        theta_bruteforce(a).amax(-1),
        u.norm(dim=-1).max(),
        spec(wo, 2),
        spec(wq, 2)[None],
        spec(wk, 2)[None],
        spec(wv, 2)[None],
        head_dim=d,
    )
    measured = measured_lipschitz(lambda x: attention(x, wq, wk, wv, wo, 1, 1, 1.0)[0], u)
    assert float(bound) == pytest.approx(0.5 * float(spec(wv, 2)), rel=1e-9)
    assert measured == pytest.approx(float(bound), rel=1e-4)


def test_bound_with_bracket_theta_upper_still_holds() -> None:
    theta_mod = pytest.importorskip("thetascope.functional.theta")
    torch.manual_seed(5)
    length, d, n_heads = 8, 16, 2
    w = [torch.randn(d, d, dtype=torch.float64) / d**0.5 for _ in range(4)]
    u = torch.randn(length, d, dtype=torch.float64)
    _, a = attention(u, w[0], w[1], w[2], w[3], n_heads, n_heads, 1.0)
    upper = theta_mod.balanced_mass_factor(a).upper.amax(-1).double()
    exact = theta_bruteforce(a).amax(-1)
    assert bool((upper >= exact - 1e-6).all())
    q, k, v = (torch.linalg.matrix_norm(head_slices(x, n_heads), 2) for x in w[:3])
    o = torch.linalg.matrix_norm(w[3], 2)
    bound_upper = mha_lipschitz_bound(upper, u.norm(dim=-1).max(), o, q, k, v, head_dim=d // n_heads)
    measured = measured_lipschitz(lambda x: attention(x, w[0], w[1], w[2], w[3], n_heads, n_heads, 1.0)[0], u)
    assert measured <= float(bound_upper)


def test_path_length_scale() -> None:
    assert path_length_scale(16) == pytest.approx(0.5)
    assert path_length_scale(27, m=3) == pytest.approx(1 / 3)
    assert path_length_scale(1) == 1.0
    assert path_length_scale(100, m=2) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="n_layers must be an int >= 1"):
        path_length_scale(0)
    with pytest.raises(ValueError, match="m must be an int >= 1"):
        path_length_scale(4, m=0)
    with pytest.raises(ValueError, match="n_layers must be an int >= 1"):
        path_length_scale(2.5)  # type: ignore[arg-type]
