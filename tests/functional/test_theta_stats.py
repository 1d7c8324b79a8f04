"""theta/entropy increments with a leading layer dimension against numpy on each layer's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thetascope.functional.theta import ThetaBounds
from thetascope.functional.theta_stats import (
    ThetaIncrement,
    _histogram_quantile,
    _theta_compute,
    _theta_update,
)


def test_stacked_increments_give_each_layers_statistics() -> None:
    # Three "layers" with different row counts (one empty): the stacked computation (as the attention monitor
    # runs it after its reduction, histograms as floats) must give numpy's values of each layer on its own.
    gen = torch.Generator().manual_seed(3)
    layers = []
    for n in (500, 37, 0):
        lower = torch.rand(n, generator=gen) ** 0.3
        layers.append(ThetaBounds(lower, (lower + 1e-3 * torch.rand(n, generator=gen)).clamp_max(1.0)))
    incs = [_theta_update(b, 0.99, 1000) for b in layers]
    fields = ThetaIncrement._fields
    stacked = ThetaIncrement(*(torch.stack([getattr(i, f).float() for i in incs]) for f in fields))
    out = _theta_compute(*stacked, quantiles=(0.1, 0.5))
    assert out["p10"].shape == (3,)
    for k, b in enumerate(layers):
        mids = (0.5 * (b.lower + b.upper)).double().numpy()
        if mids.size == 0:
            assert all(np.isnan(float(out[f][k])) for f in ("max", "mean", "p10", "p50"))
            continue
        assert float(out["max"][k]) == pytest.approx(float(b.upper.max()))
        assert float(out["mean"][k]) == pytest.approx(mids.mean(), rel=1e-5)
        assert float(out["frac_ge_threshold"][k]) == pytest.approx(float((b.lower >= 0.99).double().mean()))
        for q, key in ((0.1, "p10"), (0.5, "p50")):
            assert float(out[key][k]) == pytest.approx(np.quantile(mids, q), abs=1e-3 + 1e-6)


def test_histogram_quantile_rows_are_independent() -> None:
    hist = torch.tensor([[0, 10, 0, 0], [3, 0, 0, 1], [0, 0, 0, 0]])
    rows = _histogram_quantile(hist, 0.5)
    assert torch.equal(rows[:2], torch.stack([_histogram_quantile(h, 0.5) for h in hist[:2]]))
    assert torch.isnan(rows[2])
