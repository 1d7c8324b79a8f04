"""Statistics of attention rows as update/compute pairs: theta bracket distribution, entropy, S_l.

Each ``_<name>_update`` turns one batch of rows into reducible increments (sums, counts, maxima and a
fixed-bin histogram); each ``_<name>_compute`` turns accumulated (or cross-rank reduced) increments into the
reported values. The torchmetrics classes (:mod:`thetascope.metrics`) and the attention monitor core
(:mod:`thetascope.monitors.attention`) both call these, so every statistic has one implementation, and every
value, percentiles included, is the same in one process as after summing the increments of several ranks.

Pure torch, no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from thetascope.functional import sensitivity as _sensitivity
from thetascope.functional.theta import ThetaBounds

__all__: list[str] = []

#: Histogram bins on [0, 1] behind the theta percentiles (a percentile is exact to within one bin width).
DEFAULT_THETA_BINS = 1000


class ThetaIncrement(NamedTuple):
    """Reducible increments of a batch of theta brackets (sum-reduced unless the name says max)."""

    n_rows: Tensor
    n_nonfinite: Tensor
    sum_mid: Tensor
    max_upper: Tensor
    max_lower: Tensor
    max_width: Tensor
    n_ge_threshold: Tensor
    histogram: Tensor


#: Cross-rank reduction of each :class:`ThetaIncrement` field.
THETA_INCREMENT_OPS: dict[str, str] = {
    "n_rows": "sum",
    "n_nonfinite": "sum",
    "sum_mid": "sum",
    "max_upper": "max",
    "max_lower": "max",
    "max_width": "max",
    "n_ge_threshold": "sum",
    "histogram": "sum",
}


class EntropyIncrement(NamedTuple):
    """Reducible increments of a batch of per-row entropies."""

    n_rows: Tensor
    n_nonfinite: Tensor
    sum_entropy: Tensor
    min_entropy: Tensor
    max_entropy: Tensor


#: Cross-rank reduction of each :class:`EntropyIncrement` field.
ENTROPY_INCREMENT_OPS: dict[str, str] = {
    "n_rows": "sum",
    "n_nonfinite": "sum",
    "sum_entropy": "sum",
    "min_entropy": "min",
    "max_entropy": "max",
}


def _masked_extreme(values: Tensor, valid: Tensor, largest: bool) -> Tensor:
    """Max (or min) over the last dim of ``values [K, N]`` where ``valid``: ``[K]``, -inf (+inf) if none is.

    No host sync.
    """
    fill = -math.inf if largest else math.inf
    if values.shape[-1] == 0:
        return torch.full(values.shape[:-1], fill, dtype=values.dtype, device=values.device)
    masked = values.masked_fill(~valid, fill)
    return masked.amax(dim=-1) if largest else masked.amin(dim=-1)


def _rows(x: Tensor, stacked: bool) -> Tensor:
    """``[K, N]``: the rows of each of the ``K = x.shape[0]`` stacked inputs, or ``K = 1``: all of ``x``."""
    if stacked and x.dim() == 0:
        raise ValueError("stacked=True needs a leading dimension (one entry per input)")
    x = x.reshape(x.shape[0], -1) if stacked else x.reshape(1, -1)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _theta_update(
    bounds: ThetaBounds, threshold: float = 0.99, n_bins: int = DEFAULT_THETA_BINS, *, stacked: bool = False
) -> ThetaIncrement:
    """Increments for theta brackets of any shape; non-finite rows are counted, not used.

    With ``stacked=True`` the leading dimension indexes independent inputs (e.g. layers): every field gets
    that dimension (``[K]``, the histogram ``[K, n_bins]``), computed by the same kernels as one input.

    Example:
        >>> b = ThetaBounds(torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0]))
        >>> inc = _theta_update(b, 0.99, 4)
        >>> inc.n_rows, inc.n_ge_threshold, inc.histogram
        (tensor(2), tensor(1), tensor([0, 0, 1, 1]))
        >>> _theta_update(ThetaBounds(b.lower[:, None], b.upper[:, None]), 0.99, 4, stacked=True).n_rows
        tensor([1, 1])
    """
    if bounds.lower.shape != bounds.upper.shape:
        shapes = f"{tuple(bounds.lower.shape)} vs {tuple(bounds.upper.shape)}"
        raise ValueError(f"lower and upper bounds differ in shape: {shapes}")
    lower, upper = _rows(bounds.lower, stacked), _rows(bounds.upper, stacked)  # [K, N]
    valid = torch.isfinite(lower) & torch.isfinite(upper)
    n_rows = valid.sum(dim=-1)
    mid = torch.where(valid, 0.5 * (lower + upper), 0.0)
    # Non-finite rows go to an overflow bin (index n_bins) that is dropped; scatter_add_ keeps this on device
    # (bincount would sync to size its output).
    index = (mid * n_bins).floor().clamp(0, n_bins - 1).long()
    index = torch.where(valid, index, n_bins)
    histogram = torch.zeros(index.shape[0], n_bins + 1, dtype=torch.long, device=mid.device)
    histogram.scatter_add_(1, index, torch.ones_like(index))
    inc = ThetaIncrement(
        n_rows=n_rows,
        n_nonfinite=valid.shape[-1] - n_rows,
        sum_mid=mid.sum(dim=-1),
        max_upper=_masked_extreme(upper, valid, largest=True),
        max_lower=_masked_extreme(lower, valid, largest=True),
        max_width=_masked_extreme(upper - lower, valid, largest=True),
        n_ge_threshold=(valid & (lower >= threshold)).sum(dim=-1),
        histogram=histogram[:, :n_bins],
    )
    return inc if stacked else ThetaIncrement(*(t[0] for t in inc))


def _histogram_quantile(histogram: Tensor, q: float) -> Tensor:
    """The q-quantile of the values binned into ``histogram [..., n_bins]`` (equal bins on [0, 1]), to within
    one bin width; one value per leading index.

    numpy's default (linear) definition: interpolate between the order statistics of ranks
    ``floor(q·(n−1))`` and the next one. Each order statistic is placed inside its bin as if the bin's values
    were evenly spread, so it is off by less than one bin width, and so is the interpolation. Integer rank
    arithmetic keeps the bin lookup exact for any count. NaN for an empty histogram.

    Example:
        >>> _histogram_quantile(torch.tensor([0, 10, 0, 0]), 0.1)
        tensor(0.2850)
        >>> _histogram_quantile(torch.tensor([[0, 10, 0, 0], [0, 0, 0, 0]]), 0.1)
        tensor([0.2850,    nan])
    """
    n_bins = histogram.shape[-1]
    # float histograms come out of a packed collective; their counts are exact integers below 2**24
    counts = histogram.round().long() if histogram.is_floating_point() else histogram.long()
    cumulative = counts.cumsum(-1)
    n = cumulative[..., -1]
    frac = Fraction(q).limit_denominator(1_000_000)
    rank_times_den = (n - 1).clamp_min(0) * frac.numerator
    rank = torch.div(rank_times_den, frac.denominator, rounding_mode="floor")
    weight = (rank_times_den - rank * frac.denominator).float() / frac.denominator

    def order_statistic(j: Tensor) -> Tensor:
        # The first bin whose cumulative count exceeds j holds the j-th smallest value (0-based).
        k = (cumulative <= j.unsqueeze(-1)).sum(-1).clamp_max(n_bins - 1).unsqueeze(-1)
        in_bin = counts.gather(-1, k).squeeze(-1)
        offset = (j - (cumulative.gather(-1, k).squeeze(-1) - in_bin)).float()
        return (k.squeeze(-1).float() + ((offset + 0.5) / in_bin.clamp_min(1)).clamp(0.0, 1.0)) / n_bins

    low = order_statistic(rank)
    high = order_statistic(torch.minimum(rank + 1, (n - 1).clamp_min(0)))
    return torch.where(n > 0, low + weight * (high - low), math.nan)


def quantile_key(q: float) -> str:
    """The name of the ``q``-quantile among the computed values: ``0.1 -> "p10"``, ``0.025 -> "p2.5"``.

    Example:
        >>> quantile_key(0.1), quantile_key(0.5), quantile_key(0.025)
        ('p10', 'p50', 'p2.5')
    """
    pct = round(100.0 * q, 6)
    return f"p{int(pct)}" if pct == int(pct) else f"p{pct:g}"


def _theta_compute(
    n_rows: Tensor,
    n_nonfinite: Tensor,
    sum_mid: Tensor,
    max_upper: Tensor,
    max_lower: Tensor,
    max_width: Tensor,
    n_ge_threshold: Tensor,
    histogram: Tensor,
    quantiles: Sequence[float] = (0.1,),
) -> dict[str, Tensor]:
    """Reported values from accumulated increments; every value is NaN (counts stay counts) before any row.

    Returns ``max``, ``max_lower``, ``mean`` (of the bracket midpoints), ``frac_ge_threshold``, one
    ``p<percent>`` per quantile (see :func:`quantile_key`), ``max_width``, ``n_rows`` and ``n_nonfinite``.
    The increments may carry leading dimensions (e.g. one per layer: ``[K]`` fields and a ``[K, n_bins]``
    histogram); every value then has them too.

    Example:
        >>> b = ThetaBounds(torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0]))
        >>> _theta_compute(*_theta_update(b, 0.99, 4))["mean"]
        tensor(0.7500)
    """
    empty = n_rows <= 0
    dtype = sum_mid.dtype

    def guard(x: Tensor) -> Tensor:
        return torch.where(empty, math.nan, x.to(dtype))

    n = n_rows.to(dtype).clamp_min(1)
    out = {
        "max": guard(max_upper),
        "max_lower": guard(max_lower),
        "mean": guard(sum_mid / n),
        "frac_ge_threshold": guard(n_ge_threshold.to(dtype) / n),
    }
    for q in quantiles:
        out[quantile_key(q)] = guard(_histogram_quantile(histogram, q))
    out.update(
        max_width=guard(max_width), n_rows=n_rows.round().long(), n_nonfinite=n_nonfinite.round().long()
    )
    return out


def _entropy_update(entropy: Tensor, *, stacked: bool = False) -> EntropyIncrement:
    """Increments for per-row entropies (nats) of any shape; non-finite rows are counted, not used.

    ``stacked=True``: the leading dimension indexes independent inputs, as in :func:`_theta_update`.

    Example:
        >>> inc = _entropy_update(torch.tensor([0.0, 1.0, float("nan")]))
        >>> inc.n_rows, inc.n_nonfinite, inc.sum_entropy
        (tensor(2), tensor(1), tensor(1.))
    """
    entropy = _rows(entropy, stacked)  # [K, N]
    valid = torch.isfinite(entropy)
    n_rows = valid.sum(dim=-1)
    inc = EntropyIncrement(
        n_rows=n_rows,
        n_nonfinite=valid.shape[-1] - n_rows,
        sum_entropy=torch.where(valid, entropy, 0.0).sum(dim=-1),
        min_entropy=_masked_extreme(entropy, valid, largest=False),
        max_entropy=_masked_extreme(entropy, valid, largest=True),
    )
    return inc if stacked else EntropyIncrement(*(t[0] for t in inc))


def _entropy_compute(
    n_rows: Tensor, n_nonfinite: Tensor, sum_entropy: Tensor, min_entropy: Tensor, max_entropy: Tensor
) -> dict[str, Tensor]:
    """Mean, min and max entropy over valid rows (NaN before any), plus the row counts.

    Example:
        >>> _entropy_compute(*_entropy_update(torch.tensor([0.0, 1.0])))["mean"]
        tensor(0.5000)
    """
    empty = n_rows <= 0
    dtype = sum_entropy.dtype
    return {
        "mean": torch.where(empty, math.nan, sum_entropy / n_rows.to(dtype).clamp_min(1)),
        "min": torch.where(empty, math.nan, min_entropy.to(dtype)),
        "max": torch.where(empty, math.nan, max_entropy.to(dtype)),
        "n_rows": n_rows.round().long(),
        "n_nonfinite": n_nonfinite.round().long(),
    }


def _sensitivity_update(
    theta_max: Tensor, b_bar: Tensor, proj_norm: Tensor, tau: float | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-layer ``theta_max / tau``, B̄ and G with non-finite entries set to -inf, and their count.

    The three factors are max-reducible (across updates and ranks); :func:`_sensitivity_compute` forms S.

    Example:
        >>> one = lambda v: torch.tensor([v])
        >>> t, b, g, bad = _sensitivity_update(one(0.5), one(2.0), one(3.0), 2.0)
        >>> t, bad
        (tensor([0.2500]), tensor(0))
    """
    shapes = {tuple(x.shape) for x in (theta_max, b_bar, proj_norm)}
    if len(shapes) != 1 or theta_max.dim() != 1 or theta_max.numel() == 0:
        raise ValueError(
            "theta_max, b_bar and proj_norm must be non-empty 1-D tensors [num_layers] of one shape, got "
            f"{tuple(theta_max.shape)}, {tuple(b_bar.shape)}, {tuple(proj_norm.shape)}"
        )
    # A float tau is checked here; a device tensor is trusted (checking it would sync).
    if not isinstance(tau, Tensor) and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    factors = [
        x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in (theta_max, b_bar, proj_norm)
    ]
    factors[0] = factors[0] / tau
    valid = [torch.isfinite(x) for x in factors]
    nonfinite = sum((~v).sum() for v in valid)
    t, b, g = (torch.where(v, x, -math.inf) for x, v in zip(factors, valid))
    return t, b, g, torch.as_tensor(nonfinite)


def _sensitivity_compute(
    max_theta_over_tau: Tensor, max_b_bar: Tensor, max_proj_norm: Tensor, n_nonfinite: Tensor
) -> dict[str, Tensor]:
    """S per layer from the maxima of its factors (NaN where a factor was never finite), and its max.

    Example:
        >>> one = lambda v: torch.tensor([v])
        >>> out = _sensitivity_compute(one(0.25), one(2.0), one(3.0), torch.tensor(0))
        >>> out["sensitivity"], out["sensitivity_max"]
        (tensor([3.]), tensor(3.))
    """
    t, b, g = (
        torch.where(x == -math.inf, math.nan, x) for x in (max_theta_over_tau, max_b_bar, max_proj_norm)
    )
    # looked up on the module at call time, so a test can make it fail
    sensitivity = _sensitivity.sensitivity_proxy(t, b, g)
    if sensitivity.numel() == 0:
        top = torch.tensor(math.nan, dtype=sensitivity.dtype, device=sensitivity.device)
    else:
        top = torch.where(sensitivity.isnan(), -math.inf, sensitivity).amax()
        top = torch.where(top == -math.inf, math.nan, top)
    return {
        "sensitivity": sensitivity,
        "sensitivity_max": top,
        "theta_over_tau": t,
        "b_bar": b,
        "proj_norm": g,
        "n_nonfinite": n_nonfinite.long(),
    }
