"""Curvature math against dense Hessians (float64) and between the two HVP backends."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.helpers.hessian import dense_hessian, tiny_gpt, tiny_mlp
from thetascope.functional.curvature import (
    double_backward_hvp,
    finite_difference_hvp,
    group_mean_stderr,
    hutchinson_samples,
    lanczos_top,
    power_iteration_top,
    preconditioned,
    stability_threshold,
    taylor_prediction,
)


def _math(fn):  # type: ignore[no-untyped-def]
    def call():  # type: ignore[no-untyped-def]
        with sdpa_kernel(SDPBackend.MATH):
            return fn()

    return call


@pytest.fixture(scope="module")
def mlp():  # type: ignore[no-untyped-def]
    model, loss = tiny_mlp()
    return model, loss, dense_hessian(model, loss)


@pytest.fixture(scope="module")
def gpt():  # type: ignore[no-untyped-def]
    model, loss = tiny_gpt()
    return model, _math(loss), dense_hessian(model, loss)


@pytest.mark.parametrize("which", ["mlp", "gpt"])
def test_lanczos_top_eigenvalue_matches_dense(which: str, request: pytest.FixtureRequest) -> None:
    model, loss, h = request.getfixturevalue(which)
    params = list(model.parameters())
    hvp, _, _ = double_backward_hvp(loss, params)
    v0 = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = lanczos_top(hvp, v0, 40)
    ref = torch.linalg.eigvalsh(h)[-1]
    assert abs(float(res.value) - float(ref)) <= 1e-4 * abs(float(ref))
    assert float(res.residual) < 1e-3
    # the Ritz vector is an eigenvector of the dense Hessian
    assert torch.allclose(h @ res.vector, ref * res.vector, atol=1e-3 * float(ref))


def test_power_iteration_on_psd_block_and_warm_start(mlp) -> None:  # type: ignore[no-untyped-def]
    _, _, h = mlp
    psd = h @ h  # eigenvalues λ², so the top one is the largest-magnitude one
    ref = torch.linalg.eigvalsh(psd)[-1]
    v0 = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cold = power_iteration_top(lambda v: psd @ v, v0, 300)
    assert abs(float(cold.value) - float(ref)) <= 1e-4 * float(ref)
    warm = power_iteration_top(lambda v: psd @ v, cold.vector, 2)
    assert abs(float(warm.value) - float(ref)) <= 1e-6 * float(ref)


@pytest.mark.parametrize("which", ["mlp", "gpt"])
def test_preconditioned_matches_dense(which: str, request: pytest.FixtureRequest) -> None:
    model, loss, h = request.getfixturevalue(which)
    params = list(model.parameters())
    hvp, _, _ = double_backward_hvp(loss, params)
    g = torch.Generator().manual_seed(3)
    p_diag = torch.rand(h.shape[0], dtype=torch.float64, generator=g) * 10 + 0.1  # P, positive
    d = p_diag.rsqrt()
    ref = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1]
    # the same spectrum as P⁻¹H
    assert torch.allclose(torch.linalg.eigvals(h / p_diag[:, None]).real.max(), ref, rtol=1e-8)
    res = lanczos_top(preconditioned(hvp, d), torch.ones(h.shape[0], dtype=torch.float64), 60)
    assert abs(float(res.value) - float(ref)) <= 1e-4 * abs(float(ref))


def test_hutchinson_trace_within_standard_error(gpt) -> None:  # type: ignore[no-untyped-def]
    model, loss, h = gpt
    params = list(model.parameters())
    hvp, _, grad = double_backward_hvp(loss, params)
    lengths = [p.numel() for p in params]
    samples = hutchinson_samples(hvp, lengths, 64, torch.Generator().manual_seed(4), grad)
    seg = torch.arange(len(lengths))
    mean, se = group_mean_stderr(samples, seg, len(lengths))
    diag = torch.diag(h)
    ref = torch.stack([c.sum() for c in diag.split(lengths)])
    z = (mean - ref).abs() / se.clamp_min(1e-12)
    # segments with a zero-variance estimator (diagonal blocks) must be exact
    assert torch.all((z <= 3.0) | ((mean - ref).abs() < 1e-9))
    total, total_se = group_mean_stderr(samples, torch.zeros(len(lengths), dtype=torch.long), 1)
    assert abs(float(total[0] - diag.sum())) <= 3 * float(total_se[0])


@pytest.mark.parametrize("which", ["mlp", "gpt"])
def test_finite_difference_matches_double_backward_float32(which: str) -> None:
    model, loss = tiny_mlp(torch.float32) if which == "mlp" else tiny_gpt(torch.float32)
    loss = _math(loss)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    v0 = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(5))
    exact, _, g_exact = double_backward_hvp(loss, params)
    a = lanczos_top(exact, v0, 30)
    hv_a = exact(a.vector)
    del exact  # the finite differences move the parameters in place, which a retained graph forbids
    fd, _, g_fd = finite_difference_hvp(loss, params)
    b = lanczos_top(fd, v0, 30)
    assert abs(float(a.value) - float(b.value)) <= 1e-3 * abs(float(a.value))
    hv_b = fd(a.vector)
    assert float(torch.linalg.vector_norm(hv_a - hv_b)) <= 1e-2 * float(torch.linalg.vector_norm(hv_a))
    assert torch.equal(g_exact, g_fd)
    assert all(torch.equal(p, b_) for p, b_ in zip(params, before))  # perturbations undone bitwise


def test_taylor_second_order_beats_first(gpt) -> None:  # type: ignore[no-untyped-def]
    model, loss, h = gpt
    params = list(model.parameters())
    hvp, l0, grad = double_backward_hvp(loss, params)
    g = torch.Generator().manual_seed(6)
    steps = []
    for scale in (1e-4, 1e-3):  # a gradient step with some noise, as an optimizer would take
        delta = -scale * grad + scale * 0.3 * torch.randn(grad.shape, generator=g, dtype=grad.dtype)
        h_delta = hvp(delta)
        assert torch.allclose(delta @ h_delta, delta @ h @ delta, rtol=1e-8)  # the dense quadratic form
        steps.append((delta, *taylor_prediction(grad, delta, h_delta)))
    del hvp  # moving the parameters below would invalidate its retained graph
    sizes = [p.numel() for p in params]
    for delta, first, second in steps:
        with torch.no_grad():
            for p, d in zip(params, delta.split(sizes)):
                p.add_(d.view_as(p))
            l1 = loss()
            for p, d in zip(params, delta.split(sizes)):
                p.sub_(d.view_as(p))
        observed = float(l1 - l0)
        assert abs(float(second) - observed) < 0.2 * abs(float(first) - observed)


def test_stability_thresholds() -> None:
    w = [torch.nn.Parameter(torch.zeros(1))]
    assert stability_threshold(torch.optim.SGD(w, lr=0.5)) == ("sgd", 4.0)
    kind, thr = stability_threshold(torch.optim.SGD(w, lr=0.1, momentum=0.9))  # type: ignore[misc]
    assert kind == "sgd"
    assert thr == pytest.approx(38.0)
    kind, thr = stability_threshold(torch.optim.Adam(w, lr=1e-3, betas=(0.9, 0.99)))  # type: ignore[misc]
    assert kind == "adam"
    assert thr == pytest.approx(38_000.0)
    assert stability_threshold(torch.optim.SGD(w, lr=0.1), lrs=[0.2]) == ("sgd", 10.0)
    assert stability_threshold(torch.optim.RMSprop(w, lr=0.1)) is None


def test_lanczos_continues_past_an_invariant_start() -> None:
    h = torch.diag(torch.tensor([3.0, 1.0, -5.0, 2.0], dtype=torch.float64))
    v0 = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # an eigenvector: Krylov space ends
    res = lanczos_top(lambda v: h @ v, v0, 4, generator=torch.Generator().manual_seed(0))
    assert float(res.value) == pytest.approx(3.0, rel=1e-10)
