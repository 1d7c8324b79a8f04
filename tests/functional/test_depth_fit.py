"""Depth fits and the verdict on synthetic profiles with known parameters."""

from __future__ import annotations

import math

import pytest
import torch

from thetascope.functional.depth_fit import (
    VERDICTS,
    fit_depth_profile,
    fit_power_law,
    fit_stretched_exponential,
)

DEPTHS = list(range(1, 49))


def _noisy(values: list[float], sigma: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(values), generator=gen, dtype=torch.float64) * sigma
    return [v * math.exp(float(n)) for v, n in zip(values, noise)]


@pytest.mark.parametrize("zeta", [0.5, 1.0, 1.7, -0.3])
def test_power_law_recovered_and_called_critical(zeta: float) -> None:
    prof = [2.5 * d**zeta for d in DEPTHS]
    z, a, r2, rmse = fit_power_law(prof)
    assert z == pytest.approx(zeta, abs=1e-9)
    assert a == pytest.approx(math.log(2.5), abs=1e-9)
    assert r2 == pytest.approx(1.0)
    assert rmse < 1e-9
    fit = fit_depth_profile(_noisy(prof, 0.05, 0))
    assert fit.verdict == "critical"
    assert fit.verdict_code == VERDICTS["critical"] == 0.0
    assert fit.power_exponent == pytest.approx(zeta, abs=0.05)


@pytest.mark.parametrize(("beta", "c"), [(0.5, 0.8), (0.3, 2.0), (0.7, 0.3)])
def test_stretched_exponential_recovered_and_called_subcritical(beta: float, c: float) -> None:
    prof = [math.exp(0.2 + c * d**beta) for d in DEPTHS]
    b, rate, a, r2, _ = fit_stretched_exponential(prof)
    assert b == pytest.approx(beta, abs=1e-3)
    assert rate == pytest.approx(c, rel=1e-2)
    assert a == pytest.approx(0.2, abs=1e-2)
    assert r2 == pytest.approx(1.0)
    fit = fit_depth_profile(_noisy(prof, 0.02, 1))
    assert fit.verdict == "subcritical", fit.summary()
    assert fit.stretched_beta == pytest.approx(beta, abs=0.08)
    assert fit.rmse_ratio < 0.5
    assert fit.stretched_r2 > fit.power_r2


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_exponential_growth_is_supercritical_and_decay_subcritical(rate: float) -> None:
    fit = fit_depth_profile(_noisy([math.exp(rate * d) for d in DEPTHS], 0.02, 2))
    assert fit.verdict == "supercritical", fit.summary()
    assert fit.stretched_beta == pytest.approx(1.0, abs=0.05)
    assert fit.stretched_rate == pytest.approx(rate, rel=0.1)
    decay = fit_depth_profile([math.exp(-rate * d) for d in DEPTHS])
    assert decay.verdict == "subcritical"
    assert decay.stretched_rate < 0


def test_explicit_depths_nonfinite_points_and_errors() -> None:
    depths = [2, 4, 8, 16, 32]
    prof = [d**1.2 for d in depths]
    assert fit_power_law(prof, depths)[0] == pytest.approx(1.2)
    with_nan = [*prof, math.nan, 0.0]
    assert fit_depth_profile(with_nan, [*depths, 40, 48]).n_points == 5
    with pytest.raises(ValueError, match="at least 4"):
        fit_depth_profile([1.0, 2.0, math.inf, 3.0])
    with pytest.raises(ValueError, match="entries"):
        fit_power_law([1.0, 2.0, 3.0, 4.0], [1, 2, 3])
    flat = fit_depth_profile([1.0] * 8)
    assert flat.verdict == "critical"
    assert flat.power_exponent == 0.0
    assert flat.power_r2 == 1.0
    assert set(flat.as_dict()) >= {"verdict", "stretched_beta", "power_exponent"}
