"""GradientFlow against numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thetascope.functional.gradients import gradient_pathology
from thetascope.metrics import GradientFlow

PATHOLOGY = ("early_late_ratio", "log_slope", "vanishing_layers", "min_max_ratio", "argmin_layer")
KEYS = {"layer_norms", "global_norm", "n_nonfinite", *PATHOLOGY}


def _norm_steps(n_steps: int, n_layers: int, seed: int) -> torch.Tensor:
    """Per-layer gradient norms [steps, layers] decaying with depth and noisy over steps."""
    gen = torch.Generator().manual_seed(seed)
    depth = torch.linspace(0.0, -3.0, n_layers).exp()
    return depth * (0.5 + torch.rand(n_steps, n_layers, generator=gen))


def _assert_pathology_of(out: dict[str, torch.Tensor], rms: np.ndarray) -> None:
    expected = gradient_pathology(torch.tensor(rms, dtype=torch.float32))
    for key in PATHOLOGY:
        assert float(out[key]) == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-6), key
    # Two statistics with one obvious definition, checked without thetascope.
    assert int(out["argmin_layer"]) == int(np.argmin(rms))
    assert float(out["min_max_ratio"]) == pytest.approx(rms.min() / rms.max(), rel=1e-5)


def test_rms_profile_and_global_norm_match_numpy() -> None:
    steps = _norm_steps(7, 6, seed=0)
    metric = GradientFlow()
    for row in steps:
        metric.update(row)
    out = metric.compute()
    ref = steps.double().numpy()
    rms = np.sqrt((ref**2).mean(axis=0))
    assert set(out) == KEYS
    assert out["layer_norms"].shape == (6,)
    np.testing.assert_allclose(out["layer_norms"].numpy(), rms, rtol=1e-6)
    assert float(out["global_norm"]) == pytest.approx(np.sqrt((rms**2).sum()), rel=1e-6)
    # With every value finite, that is also the RMS over steps of the global norm.
    assert float(out["global_norm"]) == pytest.approx(
        np.sqrt((np.linalg.norm(ref, axis=1) ** 2).mean()), rel=1e-6
    )
    assert int(out["n_nonfinite"]) == 0
    _assert_pathology_of(out, rms)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # merge_state leaves the count at 0
def test_forward_merge_state_and_preallocated_layers() -> None:
    steps = _norm_steps(4, 5, seed=1)
    lazy, fixed = GradientFlow(), GradientFlow(num_layers=5)
    batch_value = lazy(steps[0])
    np.testing.assert_allclose(batch_value["layer_norms"].numpy(), steps[0].numpy(), rtol=1e-6)
    for row in steps[1:]:
        lazy.update(row)
    for row in steps:
        fixed.update(row)
    torch.testing.assert_close(lazy.compute()["layer_norms"], fixed.compute()["layer_norms"])
    # merge_state reduces states like DDP does; a metric that never saw an update has size-0 states.
    fresh = GradientFlow()
    fresh.merge_state(fixed)
    torch.testing.assert_close(fresh.compute()["layer_norms"], fixed.compute()["layer_norms"])


def test_nonfinite_entries_are_counted_and_excluded_per_layer() -> None:
    inf, nan = float("inf"), float("nan")
    metric = GradientFlow()
    metric.update(torch.tensor([3.0, inf, nan]))
    metric.update(torch.tensor([4.0, 2.0, nan]))
    out = metric.compute()
    assert int(out["n_nonfinite"]) == 3
    assert float(out["layer_norms"][0]) == pytest.approx(math.sqrt((9 + 16) / 2))
    assert float(out["layer_norms"][1]) == pytest.approx(2.0)
    assert math.isnan(float(out["layer_norms"][2]))  # never finite
    assert float(out["global_norm"]) == pytest.approx(math.sqrt(12.5 + 4.0))


def test_layer_count_change_and_bad_input_raise() -> None:
    metric = GradientFlow()
    metric.update(torch.ones(4))
    with pytest.raises(ValueError, match=r"got 3 layer norms.*holds 4"):
        metric.update(torch.ones(3))
    with pytest.raises(ValueError, match=r"got 6 layer norms.*holds 5 layers from num_layers"):
        GradientFlow(num_layers=5).update(torch.ones(6))
    with pytest.raises(ValueError, match="1-D"):
        metric.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match="1-D"):
        metric.update(torch.ones(0))
    metric.reset()
    metric.update(torch.ones(3))  # reset frees the layer count
    assert metric.compute()["layer_norms"].shape == (3,)
    for kwargs in ({"vanishing_fraction": 0.0}, {"vanishing_fraction": 1.0}, {"num_layers": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            GradientFlow(**kwargs)


@pytest.mark.parametrize("num_layers", [None, 4])
def test_empty_compute_is_nan(num_layers: int | None) -> None:
    metric = GradientFlow(num_layers=num_layers)
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = metric.compute()
    assert set(out) == KEYS
    assert out["layer_norms"].shape == ((num_layers or 0),)
    assert bool(torch.isnan(out["layer_norms"]).all())
    for key in ("global_norm", *PATHOLOGY):
        assert math.isnan(float(out[key])), key


def test_bf16_input() -> None:
    steps = _norm_steps(3, 4, seed=2).to(torch.bfloat16)
    metric = GradientFlow()
    for row in steps:
        metric.update(row)
    out = metric.compute()
    rms = np.sqrt((steps.double().numpy() ** 2).mean(axis=0))
    assert out["layer_norms"].dtype == torch.float32
    np.testing.assert_allclose(out["layer_norms"].numpy(), rms, rtol=1e-6)


def test_plot() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    metric = GradientFlow()
    for row in _norm_steps(3, 4, seed=3):
        metric.update(row)
    fig, ax = metric.plot()
    legend = ax.get_legend()  # type: ignore[union-attr]
    assert legend is not None
    assert len(legend.get_texts()) == 4  # one entry per layer
    fig2, _ = metric.plot([metric.compute(), metric.compute()])
    plt.close(fig)
    plt.close(fig2)
