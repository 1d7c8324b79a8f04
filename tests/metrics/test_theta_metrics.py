"""BalancedMassFactor and AttentionEntropy against exhaustive-enumeration and numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.metrics._reference import entropy_nats, mixed_rows, theta_exhaustive
from thetascope.functional.theta import ThetaBounds
from thetascope.metrics import AttentionEntropy, BalancedMassFactor

THETA_KEYS = {"max", "max_lower", "mean", "frac_ge_threshold", "p10", "max_width", "n_rows", "n_nonfinite"}


def _normalised(rows: torch.Tensor) -> np.ndarray:
    """The float64 rows the metric brackets: each input row divided by its own sum."""
    x = rows.double().numpy()
    return x / x.sum(axis=-1, keepdims=True)


def test_balanced_mass_matches_exhaustive_over_uneven_batches() -> None:
    # L <= exact_top, so every bracket is exact and the reference is plain enumeration.
    batches = [
        mixed_rows(37, 8, seed=1).float(),
        mixed_rows(24, 8, seed=2).float().reshape(2, 3, 4, 8),  # leading dims are flattened
        mixed_rows(5, 8, seed=3).float(),
    ]
    metric = BalancedMassFactor(threshold=0.99)
    for batch in batches:
        metric.update(batch)
    out = metric.compute()
    ref = np.concatenate([theta_exhaustive(_normalised(b)).reshape(-1) for b in batches])

    assert set(out) == THETA_KEYS
    assert all(v.ndim == 0 for v in out.values())
    assert int(out["n_rows"]) == ref.size == 66
    assert int(out["n_nonfinite"]) == 0
    assert float(out["max"]) == pytest.approx(ref.max(), abs=1e-6)
    assert float(out["max_lower"]) == pytest.approx(ref.max(), abs=1e-6)
    assert float(out["max_width"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["mean"]) == pytest.approx(ref.mean(), abs=1e-6)
    assert 0 < (ref >= 0.99).sum() < ref.size  # the fraction is not trivially 0 or 1
    assert float(out["frac_ge_threshold"]) == pytest.approx((ref >= 0.99).mean(), abs=1e-7)
    assert float(out["p10"]) == pytest.approx(np.quantile(ref, 0.1), abs=1e-3 + 1e-6)


def test_balanced_mass_long_rows_with_exact_references() -> None:
    # Long rows whose true theta is known independently: support <= exact_top (enumerate the support) and
    # p_max >= 1/2 (theta = 4 p_max (1 - p_max)); plus generic rows, which must only respect the band.
    gen = torch.Generator().manual_seed(7)
    n_keys, support = 96, 9
    sparse = torch.zeros(40, n_keys, dtype=torch.float64)
    values = torch.softmax(torch.randn(40, support, generator=gen, dtype=torch.float64), dim=-1)
    for i in range(40):
        sparse[i, torch.randperm(n_keys, generator=gen)[:support]] = values[i]
    peaked = torch.softmax(torch.randn(30, n_keys, generator=gen, dtype=torch.float64), dim=-1) * 0.3
    peaked[:, 5] += 0.7
    ref_sparse = theta_exhaustive(values.numpy())
    pmax = peaked.max(dim=-1).values.numpy()
    ref_peaked = 4.0 * pmax * (1.0 - pmax)
    ref = np.concatenate([ref_sparse, ref_peaked])

    metric = BalancedMassFactor(exact_top=10)
    metric.update(sparse)
    metric.update(peaked.float())
    out = metric.compute()
    assert int(out["n_rows"]) == 70
    assert float(out["max"]) == pytest.approx(ref.max(), abs=1e-6)
    assert float(out["mean"]) == pytest.approx(ref.mean(), abs=1e-6)
    assert float(out["max_width"]) == pytest.approx(0.0, abs=1e-6)

    generic = BalancedMassFactor(exact_top=4)
    generic.update(torch.softmax(torch.randn(64, n_keys, generator=gen), dim=-1))
    band = generic.compute()
    assert 0.0 <= float(band["max_lower"]) <= float(band["max"]) <= 1.0
    assert 0.0 <= float(band["max_width"]) < 0.05


def test_balanced_mass_nonfinite_rows_are_counted_and_excluded() -> None:
    rows = mixed_rows(12, 6, seed=4).float()
    bad = rows.clone()
    bad[3, 2] = float("nan")
    bad[7] = torch.softmax(torch.full((6,), -math.inf), dim=-1)  # a fully masked row: all NaN
    metric = BalancedMassFactor()
    metric.update(bad)
    out = metric.compute()
    keep = [i for i in range(12) if i not in (3, 7)]
    ref = theta_exhaustive(_normalised(rows[keep]))
    assert int(out["n_rows"]) == 10
    assert int(out["n_nonfinite"]) == 2
    assert float(out["mean"]) == pytest.approx(ref.mean(), abs=1e-6)
    assert float(out["max"]) == pytest.approx(ref.max(), abs=1e-6)
    assert all(math.isfinite(float(v)) for v in out.values())


def test_balanced_mass_update_bounds() -> None:
    nan = float("nan")
    metric = BalancedMassFactor(threshold=0.9)
    metric.update_bounds(ThetaBounds(torch.tensor([0.2, 0.9, nan]), torch.tensor([0.3, 1.0, nan])))
    metric.update(bounds=ThetaBounds(torch.tensor([[0.5]]), torch.tensor([[0.5]])))
    out = metric.compute()
    assert int(out["n_rows"]) == 3
    assert int(out["n_nonfinite"]) == 1
    assert float(out["max"]) == pytest.approx(1.0)
    assert float(out["max_lower"]) == pytest.approx(0.9)
    assert float(out["max_width"]) == pytest.approx(0.1)
    assert float(out["mean"]) == pytest.approx((0.25 + 0.95 + 0.5) / 3)
    assert float(out["frac_ge_threshold"]) == pytest.approx(1 / 3)  # on the LOWER bound: only 0.9 >= 0.9


def test_balanced_mass_bf16_input() -> None:
    rows = torch.softmax(torch.randn(40, 6) * 2, dim=-1).to(torch.bfloat16)
    metric = BalancedMassFactor()
    metric.update(rows)
    out = metric.compute()
    ref = theta_exhaustive(_normalised(rows.float()))
    assert out["mean"].dtype == torch.float32
    assert float(out["max"]) == pytest.approx(ref.max(), abs=1e-5)
    assert float(out["mean"]) == pytest.approx(ref.mean(), abs=1e-5)


def test_balanced_mass_bad_input_raises() -> None:
    metric = BalancedMassFactor()
    with pytest.raises(ValueError, match="negative"):
        metric.update(torch.tensor([[0.6, 0.6, -0.2]]))
    with pytest.raises(ValueError, match="sums to"):
        metric.update(torch.tensor([[0.5, 0.7]]))
    with pytest.raises(ValueError, match="floating-point"):
        metric.update(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="exactly one"):
        metric.update()
    with pytest.raises(ValueError, match="exactly one"):
        metric.update(torch.ones(1, 2) / 2, bounds=ThetaBounds(torch.ones(1), torch.ones(1)))
    # validate=False skips the check (rows are normalised by their sums instead).
    lax = BalancedMassFactor(validate=False)
    lax.update(torch.tensor([[0.5, 0.7]]))
    assert float(lax.compute()["max"]) == pytest.approx(4 * (5 / 12) * (7 / 12), abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"exact_top": 0}, "exact_top"),
        ({"exact_top": 21}, "exact_top"),
        ({"exact_top": True}, "exact_top"),
        ({"threshold": 1.5}, "threshold"),
        ({"n_bins": 0}, "n_bins"),
    ],
)
def test_balanced_mass_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        BalancedMassFactor(**kwargs)  # type: ignore[arg-type]


def test_empty_compute_gives_nan_and_reset_clears() -> None:
    theta, entropy = BalancedMassFactor(), AttentionEntropy()
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = theta.compute()
    assert set(out) == THETA_KEYS
    assert int(out["n_rows"]) == 0
    assert all(math.isnan(float(out[k])) for k in THETA_KEYS - {"n_rows", "n_nonfinite"})
    with pytest.warns(UserWarning, match="before the ``update``"):
        ent = entropy.compute()
    assert all(math.isnan(float(ent[k])) for k in ("mean", "min", "max"))

    # Only non-finite rows: still NaN values, rows counted, no crash.
    theta.update(torch.full((3, 4), float("nan")))
    out = theta.compute()
    assert int(out["n_nonfinite"]) == 3
    assert math.isnan(float(out["max"]))

    theta.update(torch.tensor([[0.5, 0.5]]))
    assert float(theta.compute()["max"]) == pytest.approx(1.0)
    theta.reset()
    assert int(theta.n_rows) == 0
    assert int(theta.histogram.sum()) == 0


def test_forward_returns_batch_value_and_accumulates() -> None:
    a, b = mixed_rows(10, 5, seed=5).float(), mixed_rows(6, 5, seed=6).float()
    metric = BalancedMassFactor()
    batch_a = metric(a)
    batch_b = metric(b)
    ref_a, ref_b = theta_exhaustive(_normalised(a)), theta_exhaustive(_normalised(b))
    assert float(batch_a["mean"]) == pytest.approx(ref_a.mean(), abs=1e-6)
    assert float(batch_b["mean"]) == pytest.approx(ref_b.mean(), abs=1e-6)
    total = metric.compute()
    assert int(total["n_rows"]) == 16
    assert float(total["mean"]) == pytest.approx(np.concatenate([ref_a, ref_b]).mean(), abs=1e-6)


def test_float64_states() -> None:
    metric = BalancedMassFactor().set_dtype(torch.float64)
    metric.update(mixed_rows(20, 6, seed=8))
    out = metric.compute()
    ref = theta_exhaustive(mixed_rows(20, 6, seed=8).numpy())
    assert out["mean"].dtype == torch.float64
    assert float(out["mean"]) == pytest.approx(ref.mean(), abs=1e-12)
    assert int(out["n_rows"]) == 20


def test_attention_entropy_matches_numpy() -> None:
    batches = [mixed_rows(30, 7, seed=9).float(), mixed_rows(12, 7, seed=10).float().reshape(3, 4, 7)]
    batches[0][4, 1] = float("nan")
    metric = AttentionEntropy()
    for batch in batches:
        metric.update(batch)
    metric.update_entropy(torch.tensor([0.25, float("inf")]))
    out = metric.compute()
    rows = np.concatenate([b.reshape(-1, 7).double().numpy() for b in batches])
    ref = entropy_nats(rows)
    ref = np.concatenate([ref[np.isfinite(ref)], [0.25]])
    assert set(out) == {"mean", "min", "max", "n_rows", "n_nonfinite"}
    assert int(out["n_rows"]) == ref.size == 42
    assert int(out["n_nonfinite"]) == 2
    assert float(out["mean"]) == pytest.approx(ref.mean(), abs=1e-6)
    assert float(out["min"]) == pytest.approx(ref.min(), abs=1e-6)  # the one-hot row: 0
    assert float(out["max"]) == pytest.approx(np.log(7), abs=1e-6)  # the uniform row


def test_attention_entropy_bf16_and_bad_input() -> None:
    rows = torch.softmax(torch.randn(16, 9), dim=-1).to(torch.bfloat16)
    metric = AttentionEntropy()
    metric.update(rows)
    out = metric.compute()
    assert out["mean"].dtype == torch.float32
    assert float(out["mean"]) == pytest.approx(entropy_nats(rows.double().numpy()).mean(), abs=1e-5)
    with pytest.raises(ValueError):
        metric.update(torch.tensor(0.5))
    with pytest.raises(ValueError, match="exactly one"):
        metric.update()


def test_plot() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    theta, entropy = BalancedMassFactor(), AttentionEntropy()
    rows = torch.softmax(torch.randn(32, 12), dim=-1)
    theta.update(rows)
    entropy.update(rows)
    for metric in (theta, entropy):
        fig, ax = metric.plot()
        assert fig is not None
        legend = ax.get_legend()  # type: ignore[union-attr]
        assert legend is not None
        assert {t.get_text() for t in legend.get_texts()} >= {"mean", "max"}
        fig2, _ = metric.plot([metric.compute(), metric.compute()])
        plt.close(fig)
        plt.close(fig2)
