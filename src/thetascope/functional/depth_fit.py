"""Fits of an APJN depth profile: power law vs stretched exponential, and the criticality verdict.

With ``J_l`` the APJN from the input of the first block to the output of block ``l`` (depth ``l = 1..L``):

* power law: ``log J_l = a + zeta * log l`` (critical: polynomial growth, as in pre-LN transformers);
* stretched exponential: ``log J_l = a + c * l**beta`` with ``0 < beta <= 2`` (``beta = 1`` is a plain
  exponential).

Both are least-squares fits in log space; the stretched exponential is fitted by a grid over ``beta`` (closed
form for ``a``, ``c`` at each ``beta``) refined by golden-section search. Fit quality is ``R^2`` and the RMSE
of ``log J``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = ["VERDICTS", "DepthFit", "fit_depth_profile", "fit_power_law", "fit_stretched_exponential"]

#: The verdicts of :func:`fit_depth_profile`, with the numeric code logged for each.
VERDICTS: dict[str, float] = {"subcritical": -1.0, "critical": 0.0, "supercritical": 1.0}

_BETA_MIN, _BETA_MAX = 0.02, 2.0


@dataclass(frozen=True)
class DepthFit:
    """Both fits of one profile and the verdict drawn from them (see :func:`fit_depth_profile`).

    Attributes:
        n_points: number of depths used (finite, positive APJN values).
        power_exponent: ``zeta`` of ``J ~ l**zeta``.
        power_r2, power_rmse: fit quality of the power law (log space).
        stretched_beta, stretched_rate: ``beta`` and ``c`` of ``J ~ exp(c * l**beta)``.
        stretched_r2, stretched_rmse: fit quality of the stretched exponential (log space).
        rmse_ratio: ``stretched_rmse / power_rmse``; well below 1 means the stretched exponential explains the
            profile much better.
        verdict: ``"critical"``, ``"subcritical"`` or ``"supercritical"``.
    """

    n_points: int
    power_exponent: float
    power_intercept: float
    power_r2: float
    power_rmse: float
    stretched_beta: float
    stretched_rate: float
    stretched_intercept: float
    stretched_r2: float
    stretched_rmse: float
    rmse_ratio: float
    verdict: str

    @property
    def verdict_code(self) -> float:
        """The verdict as a number for loggers: -1 subcritical, 0 critical, 1 supercritical."""
        return VERDICTS[self.verdict]

    def as_dict(self) -> dict[str, float | int | str]:
        """All fields as a plain dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line with the verdict and the numbers behind it.

        Example:
            >>> fit_depth_profile([float(l) ** 1.5 for l in range(1, 13)]).summary()[:42]
            'critical: power law zeta=1.500 (R^2=1.000)'
        """
        return (
            f"{self.verdict}: power law zeta={self.power_exponent:.3f} (R^2={self.power_r2:.3f}); "
            f"stretched exp beta={self.stretched_beta:.3f}, c={self.stretched_rate:.3g} "
            f"(R^2={self.stretched_r2:.3f}); RMSE ratio {self.rmse_ratio:.2f} over {self.n_points} depths"
        )


def _line_fit(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Least squares ``y = a + b x`` along the last dim: ``(a, b, sse)``; a constant ``x`` gives ``b = 0``."""
    xm, ym = x.mean(-1, keepdim=True), y.mean(-1, keepdim=True)
    sxx = (x - xm).square().sum(-1)
    b = torch.where(sxx > 0, ((x - xm) * (y - ym)).sum(-1) / sxx.clamp_min(1e-300), torch.zeros_like(sxx))
    a = ym.squeeze(-1) - b * xm.squeeze(-1)
    sse = (y - a.unsqueeze(-1) - b.unsqueeze(-1) * x).square().sum(-1)
    return a, b, sse


def _prepare(
    profile: Sequence[float] | Tensor, depths: Sequence[float] | Tensor | None
) -> tuple[Tensor, Tensor]:
    y = torch.as_tensor(profile, dtype=torch.float64).reshape(-1)
    x = (
        torch.arange(1, y.numel() + 1, dtype=torch.float64)
        if depths is None
        else torch.as_tensor(depths, dtype=torch.float64).reshape(-1)
    )
    if x.numel() != y.numel():
        raise ValueError(f"depths has {x.numel()} entries but the profile {y.numel()}")
    keep = torch.isfinite(y) & (y > 0) & torch.isfinite(x) & (x > 0)
    if int(keep.sum()) < 4:
        raise ValueError(
            f"a depth fit needs at least 4 finite positive APJN values at depths > 0, got {int(keep.sum())}"
        )
    return x[keep], y[keep].log()


def _r2(sse: float, logy: Tensor) -> float:
    sst = float((logy - logy.mean()).square().sum())
    if sst <= 1e-24:
        return 1.0 if sse <= 1e-20 else 0.0
    return 1.0 - sse / sst


def fit_power_law(
    profile: Sequence[float] | Tensor, depths: Sequence[float] | Tensor | None = None
) -> tuple[float, float, float, float]:
    """``(zeta, a, r2, rmse)`` of ``log J = a + zeta log l`` (depths ``1..L`` unless given).

    Example:
        >>> [round(v, 6) for v in fit_power_law([3.0 * l**0.5 for l in range(1, 9)])[:3]]
        [0.5, 1.098612, 1.0]
    """
    x, logy = _prepare(profile, depths)
    a, b, sse = _line_fit(x.log(), logy)
    return float(b), float(a), _r2(float(sse), logy), math.sqrt(float(sse) / logy.numel())


def fit_stretched_exponential(
    profile: Sequence[float] | Tensor, depths: Sequence[float] | Tensor | None = None
) -> tuple[float, float, float, float, float]:
    """``(beta, c, a, r2, rmse)`` of ``log J = a + c l**beta``, ``beta`` in ``[0.02, 2]``.

    Example:
        >>> beta, c = fit_stretched_exponential([math.exp(0.8 * l**0.5) for l in range(1, 25)])[:2]
        >>> round(beta, 3), round(c, 3)
        (0.5, 0.8)
    """
    x, logy = _prepare(profile, depths)
    # depths scaled to max 1 keep l**beta well conditioned; c is rescaled back below
    scale = float(x.max())
    xs = x / scale
    grid = torch.linspace(_BETA_MIN, _BETA_MAX, 397, dtype=torch.float64)  # [G]
    _, _, sse = _line_fit(xs.unsqueeze(0) ** grid.unsqueeze(1), logy.expand(grid.numel(), -1))
    best = int(sse.argmin())
    lo = float(grid[max(best - 1, 0)])
    hi = float(grid[min(best + 1, grid.numel() - 1)])

    def cost(beta: float) -> float:
        return float(_line_fit(xs**beta, logy)[2])

    phi = (math.sqrt(5.0) - 1.0) / 2.0
    c1, c2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
    f1, f2 = cost(c1), cost(c2)
    for _ in range(60):
        if f1 < f2:
            hi, c2, f2 = c2, c1, f1
            c1 = hi - phi * (hi - lo)
            f1 = cost(c1)
        else:
            lo, c1, f1 = c1, c2, f2
            c2 = lo + phi * (hi - lo)
            f2 = cost(c2)
    beta = 0.5 * (lo + hi)
    a, c, sse_b = _line_fit(xs**beta, logy)
    return (
        beta,
        float(c) / scale**beta,
        float(a),
        _r2(float(sse_b), logy),
        math.sqrt(float(sse_b) / logy.numel()),
    )


def fit_depth_profile(
    profile: Sequence[float] | Tensor,
    depths: Sequence[float] | Tensor | None = None,
    *,
    rmse_margin: float = 0.5,
    exponential_beta: float = 0.85,
    noise_floor: float = 1e-3,
) -> DepthFit:
    """Fit ``profile`` (APJN at depths ``1..L``, or ``depths``) both ways and give a verdict.

    The stretched exponential has one parameter more and tends to the power law as ``beta -> 0``, so it is
    preferred only when it is clearly better: its log-space RMSE below ``rmse_margin`` times the power law's,
    and the power law's above ``noise_floor`` (a near-perfect power law stays critical). Then:

    * ``c < 0`` (exponential-type decay): ``"subcritical"`` (the ordered phase);
    * ``beta >= exponential_beta``: ``"supercritical"`` (exponential growth, the chaotic phase);
    * otherwise (stretched-exponential growth, ``beta < exponential_beta``): ``"subcritical"``, the seed
      paper's reading of normalisation-free (tanh-like) transformers.

    Otherwise the verdict is ``"critical"`` (power-law growth or decay, exponent ``zeta``).

    Raises:
        ValueError: with fewer than 4 finite positive values.

    Example:
        >>> fit_depth_profile([math.exp(0.3 * l) for l in range(1, 17)]).verdict
        'supercritical'
        >>> fit_depth_profile([math.exp(l**0.4) for l in range(1, 17)]).verdict
        'subcritical'
    """
    zeta, a_p, r2_p, rmse_p = fit_power_law(profile, depths)
    beta, c, a_s, r2_s, rmse_s = fit_stretched_exponential(profile, depths)
    ratio = rmse_s / rmse_p if rmse_p > 0 else 1.0
    if rmse_p > noise_floor and rmse_s < rmse_margin * rmse_p:
        verdict = "subcritical" if c < 0 or beta < exponential_beta else "supercritical"
    else:
        verdict = "critical"
    n = int(_prepare(profile, depths)[0].numel())
    return DepthFit(n, zeta, a_p, r2_p, rmse_p, beta, c, a_s, r2_s, rmse_s, ratio, verdict)
