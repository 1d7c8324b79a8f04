"""SensitivityProxy against the formula S = (theta_max / tau) · B̄² · G evaluated directly in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thetascope.metrics import SensitivityProxy

KEYS = {"sensitivity", "sensitivity_max", "theta_over_tau", "b_bar", "proj_norm", "n_nonfinite"}


def test_split_measurement_equals_whole() -> None:
    # One measurement whose rows/tokens were seen in 3 parts (micro-batches or ranks): per-layer maxima of
    # theta and of token norms over the parts, G and tau fixed.
    gen = torch.Generator().manual_seed(0)
    n_layers = 5
    theta = torch.rand(3, n_layers, generator=gen)  # per part, max theta of each layer
    b_bar = 1.0 + 10.0 * torch.rand(3, n_layers, generator=gen)
    proj_norm = 0.5 + torch.rand(n_layers, generator=gen)
    tau = 2.5
    metric = SensitivityProxy()
    for part in range(3):
        metric.update(theta[part], b_bar[part], proj_norm, tau=tau)
    out = metric.compute()

    t, b, g = theta.double().numpy(), b_bar.double().numpy(), proj_norm.double().numpy()
    expected = t.max(axis=0) / tau * b.max(axis=0) ** 2 * g
    assert set(out) == KEYS
    np.testing.assert_allclose(out["sensitivity"].numpy(), expected, rtol=1e-6)
    assert float(out["sensitivity_max"]) == pytest.approx(expected.max(), rel=1e-6)
    np.testing.assert_allclose(out["b_bar"].numpy(), b.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out["theta_over_tau"].numpy(), t.max(axis=0) / tau, rtol=1e-6)
    assert int(out["n_nonfinite"]) == 0


def test_nonfinite_inputs_are_counted_and_excluded() -> None:
    nan, inf = float("nan"), float("inf")
    metric = SensitivityProxy(num_layers=3)
    metric.update(torch.tensor([0.5, nan, nan]), torch.tensor([2.0, 3.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    metric.update(torch.tensor([0.2, 1.0, nan]), torch.tensor([inf, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    out = metric.compute()
    assert int(out["n_nonfinite"]) == 4
    assert float(out["sensitivity"][0]) == pytest.approx(0.5 * 4.0)
    assert float(out["sensitivity"][1]) == pytest.approx(1.0 * 9.0)
    assert math.isnan(float(out["sensitivity"][2]))  # theta never finite
    assert float(out["sensitivity_max"]) == pytest.approx(9.0)  # NaN layers do not hide the others


def test_tensor_tau_bf16_and_bad_input() -> None:
    metric = SensitivityProxy()
    metric.update(
        torch.tensor([1.0, 0.5], dtype=torch.bfloat16),
        torch.tensor([2.0, 4.0], dtype=torch.bfloat16),
        torch.tensor([1.0, 2.0]),
        tau=torch.tensor(4.0),
    )
    out = metric.compute()
    assert out["sensitivity"].dtype == torch.float32
    np.testing.assert_allclose(out["sensitivity"].numpy(), [1.0, 4.0], rtol=1e-6)
    with pytest.raises(ValueError, match="tau"):
        metric.update(torch.ones(2), torch.ones(2), torch.ones(2), tau=0.0)
    with pytest.raises(ValueError, match="one shape"):
        metric.update(torch.ones(2), torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"got 3 layers.*holds 2"):
        metric.update(torch.ones(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="num_layers"):
        SensitivityProxy(num_layers=0)


@pytest.mark.parametrize("num_layers", [None, 2])
def test_empty_compute_is_nan(num_layers: int | None) -> None:
    metric = SensitivityProxy(num_layers=num_layers)
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = metric.compute()
    assert set(out) == KEYS
    assert out["sensitivity"].shape == ((num_layers or 0),)
    assert bool(out["sensitivity"].isnan().all())
    assert math.isnan(float(out["sensitivity_max"]))


def test_forward_and_plot() -> None:
    metric = SensitivityProxy()
    batch = metric(torch.tensor([0.5, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0]))
    np.testing.assert_allclose(batch["sensitivity"].numpy(), [2.0, 3.0], rtol=1e-6)
    metric(torch.tensor([1.0, 0.1]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]))
    np.testing.assert_allclose(metric.compute()["sensitivity"].numpy(), [4.0, 3.0], rtol=1e-6)

    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig, ax = metric.plot()
    legend = ax.get_legend()  # type: ignore[union-attr]
    assert legend is not None
    assert len(legend.get_texts()) == 2
    fig2, _ = metric.plot([metric.compute(), metric.compute()])
    plt.close(fig)
    plt.close(fig2)
