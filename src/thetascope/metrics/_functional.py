"""Private update/compute pairs behind the metric classes (pure torch, no host synchronisation).

Each ``_<name>_update`` turns one batch into additive (or max/min) state increments; each ``_<name>_compute``
turns accumulated states into the reported values. The metric classes only hold the states, so the same math
runs in one process or after a DDP reduction of the states.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from thetascope.functional.gradients import gradient_pathology
from thetascope.functional.sensitivity import sensitivity_proxy
from thetascope.functional.theta import ThetaBounds

# Keys of ``gradient_pathology``; used to report NaN for each before any layer norm has been seen.
PATHOLOGY_KEYS: tuple[str, ...] = (
    "early_late_ratio",
    "log_slope",
    "vanishing_layers",
    "min_max_ratio",
    "argmin_layer",
)


class _BalancedMassIncrement(NamedTuple):
    n_rows: Tensor
    n_nonfinite: Tensor
    sum_mid: Tensor
    max_upper: Tensor
    max_lower: Tensor
    max_width: Tensor
    n_ge_threshold: Tensor
    histogram: Tensor


class _EntropyIncrement(NamedTuple):
    n_rows: Tensor
    n_nonfinite: Tensor
    sum_entropy: Tensor
    min_entropy: Tensor
    max_entropy: Tensor


def _masked_extreme(values: Tensor, valid: Tensor, largest: bool) -> Tensor:
    """Max (or min) of ``values`` where ``valid``; -inf (+inf) when nothing is valid. No host sync."""
    fill = -math.inf if largest else math.inf
    if values.numel() == 0:
        return torch.tensor(fill, dtype=values.dtype, device=values.device)
    masked = values.masked_fill(~valid, fill)
    return masked.amax() if largest else masked.amin()


def _balanced_mass_update(bounds: ThetaBounds, threshold: float, n_bins: int) -> _BalancedMassIncrement:
    """State increments for a batch of theta brackets of any shape; non-finite rows are counted, not used.

    Example:
        >>> import torch
        >>> from thetascope.functional import ThetaBounds
        >>> b = ThetaBounds(torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0]))
        >>> inc = _balanced_mass_update(b, 0.99, 4)
        >>> inc.n_rows, inc.n_ge_threshold, inc.histogram
        (tensor(2), tensor(1), tensor([0, 0, 1, 1]))
    """
    lower = bounds.lower.reshape(-1)
    upper = bounds.upper.reshape(-1)
    if lower.shape != upper.shape:
        raise ValueError(
            f"lower and upper bounds differ in shape: {tuple(lower.shape)} vs {tuple(upper.shape)}"
        )
    valid = torch.isfinite(lower) & torch.isfinite(upper)
    n_rows = valid.sum()
    mid = torch.where(valid, 0.5 * (lower + upper), 0.0)
    # Non-finite rows go to an overflow bin (index n_bins) that is dropped; scatter_add_ keeps this on device
    # (bincount would sync to size its output).
    index = (mid * n_bins).floor().clamp(0, n_bins - 1).long()
    index = torch.where(valid, index, n_bins)
    histogram = torch.zeros(n_bins + 1, dtype=torch.long, device=mid.device)
    histogram.scatter_add_(0, index, torch.ones_like(index))
    return _BalancedMassIncrement(
        n_rows=n_rows,
        n_nonfinite=valid.numel() - n_rows,
        sum_mid=mid.sum(),
        max_upper=_masked_extreme(upper, valid, largest=True),
        max_lower=_masked_extreme(lower, valid, largest=True),
        max_width=_masked_extreme(upper - lower, valid, largest=True),
        n_ge_threshold=(valid & (lower >= threshold)).sum(),
        histogram=histogram[:n_bins],
    )


def _histogram_quantile(histogram: Tensor, q: float) -> Tensor:
    """The q-quantile of the values binned into ``histogram`` (equal bins on [0, 1]), to within one bin width.

    numpy's default (linear) definition: interpolate between the order statistics of ranks
    ``floor(q·(n−1))`` and the next one. Each order statistic is placed inside its bin as if the bin's values
    were evenly spread, so it is off by less than one bin width, and so is the interpolation. Integer rank
    arithmetic keeps the bin lookup exact for any count. NaN for an empty histogram.

    Example:
        >>> _histogram_quantile(torch.tensor([0, 10, 0, 0]), 0.1)
        tensor(0.2850)
    """
    n_bins = histogram.numel()
    counts = histogram.long()
    cumulative = counts.cumsum(0)
    n = cumulative[-1]
    frac = Fraction(q).limit_denominator(1_000_000)
    rank_times_den = (n - 1).clamp_min(0) * frac.numerator
    rank = torch.div(rank_times_den, frac.denominator, rounding_mode="floor")
    weight = (rank_times_den - rank * frac.denominator).float() / frac.denominator

    def order_statistic(j: Tensor) -> Tensor:
        # The first bin whose cumulative count exceeds j holds the j-th smallest value (0-based).
        k = (cumulative <= j).sum().clamp_max(n_bins - 1)
        offset = (j - (cumulative[k] - counts[k])).float()
        return (k.float() + ((offset + 0.5) / counts[k].clamp_min(1)).clamp(0.0, 1.0)) / n_bins

    low = order_statistic(rank)
    high = order_statistic(torch.minimum(rank + 1, (n - 1).clamp_min(0)))
    return torch.where(n > 0, low + weight * (high - low), math.nan)


def _balanced_mass_compute(
    n_rows: Tensor,
    n_nonfinite: Tensor,
    sum_mid: Tensor,
    max_upper: Tensor,
    max_lower: Tensor,
    max_width: Tensor,
    n_ge_threshold: Tensor,
    histogram: Tensor,
    quantile: float = 0.1,
) -> dict[str, Tensor]:
    """Reported values from accumulated states; every value is NaN (counts stay counts) before any valid row.

    Example:
        >>> import torch
        >>> from thetascope.functional import ThetaBounds
        >>> b = ThetaBounds(torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0]))
        >>> inc = _balanced_mass_update(b, 0.99, 4)
        >>> _balanced_mass_compute(*inc)["mean"]
        tensor(0.7500)
    """
    empty = n_rows <= 0
    dtype = sum_mid.dtype

    def guard(x: Tensor) -> Tensor:
        return torch.where(empty, math.nan, x.to(dtype))

    n = n_rows.to(dtype).clamp_min(1)
    return {
        "max": guard(max_upper),
        "max_lower": guard(max_lower),
        "mean": guard(sum_mid / n),
        "frac_ge_threshold": guard(n_ge_threshold.to(dtype) / n),
        "p10": guard(_histogram_quantile(histogram, quantile)),
        "max_width": guard(max_width),
        "n_rows": n_rows.long(),
        "n_nonfinite": n_nonfinite.long(),
    }


def _attention_entropy_update(entropy: Tensor) -> _EntropyIncrement:
    """State increments for a batch of per-row entropies (nats); non-finite rows are counted, not used.

    Example:
        >>> inc = _attention_entropy_update(torch.tensor([0.0, 1.0, float("nan")]))
        >>> inc.n_rows, inc.n_nonfinite, inc.sum_entropy
        (tensor(2), tensor(1), tensor(1.))
    """
    entropy = (
        entropy.reshape(-1).float()
        if entropy.dtype in (torch.float16, torch.bfloat16)
        else entropy.reshape(-1)
    )
    valid = torch.isfinite(entropy)
    n_rows = valid.sum()
    return _EntropyIncrement(
        n_rows=n_rows,
        n_nonfinite=valid.numel() - n_rows,
        sum_entropy=torch.where(valid, entropy, 0.0).sum(),
        min_entropy=_masked_extreme(entropy, valid, largest=False),
        max_entropy=_masked_extreme(entropy, valid, largest=True),
    )


def _attention_entropy_compute(
    n_rows: Tensor, n_nonfinite: Tensor, sum_entropy: Tensor, min_entropy: Tensor, max_entropy: Tensor
) -> dict[str, Tensor]:
    """Mean, min and max entropy over valid rows (NaN before any), plus the row counts.

    Example:
        >>> _attention_entropy_compute(*_attention_entropy_update(torch.tensor([0.0, 1.0])))["mean"]
        tensor(0.5000)
    """
    empty = n_rows <= 0
    dtype = sum_entropy.dtype
    return {
        "mean": torch.where(empty, math.nan, sum_entropy / n_rows.to(dtype).clamp_min(1)),
        "min": torch.where(empty, math.nan, min_entropy.to(dtype)),
        "max": torch.where(empty, math.nan, max_entropy.to(dtype)),
        "n_rows": n_rows.long(),
        "n_nonfinite": n_nonfinite.long(),
    }


def _gradient_flow_update(layer_norms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer sum of squares and count of finite norms, and the number of non-finite entries.

    Example:
        >>> _gradient_flow_update(torch.tensor([3.0, float("inf")]))
        (tensor([9., 0.]), tensor([1, 0]), tensor(1))
    """
    if layer_norms.dim() != 1:
        raise ValueError(f"layer_norms must be 1-D [num_layers], got shape {tuple(layer_norms.shape)}")
    norms = layer_norms.float() if layer_norms.dtype in (torch.float16, torch.bfloat16) else layer_norms
    valid = torch.isfinite(norms)
    squares = torch.where(valid, norms, 0.0).square()
    return squares, valid.long(), (~valid).sum()


def _gradient_flow_compute(
    sum_squares: Tensor, count: Tensor, n_nonfinite: Tensor, vanishing_fraction: float
) -> dict[str, Tensor]:
    """Per-layer RMS over updates, the global norm sqrt(Σ RMS²), and the pathology statistics (as floats).

    Layers that never had a finite norm are NaN (the global norm sums the others). Before any update every
    value is NaN.

    Example:
        >>> squares, count = torch.tensor([9.0, 16.0]), torch.tensor([1, 1])
        >>> out = _gradient_flow_compute(squares, count, torch.tensor(0), 0.01)
        >>> out["layer_norms"], out["global_norm"]
        (tensor([3., 4.]), tensor(5.))
    """
    dtype = sum_squares.dtype if sum_squares.is_floating_point() else torch.get_default_dtype()
    seen = count > 0
    mean_square = sum_squares.to(dtype) / count.to(dtype).clamp_min(1)
    layer_norms = torch.where(seen, mean_square.sqrt(), math.nan)
    nan = torch.tensor(math.nan, dtype=dtype, device=sum_squares.device)
    out: dict[str, Tensor] = {
        "layer_norms": layer_norms,
        "global_norm": torch.where(seen.any(), torch.where(seen, mean_square, 0.0).sum().sqrt(), nan),
        "n_nonfinite": n_nonfinite.long(),
    }
    if layer_norms.numel() == 0:
        out.update(dict.fromkeys(PATHOLOGY_KEYS, nan))
        return out
    # Float for every key (counts and indices included) so that "no data" can be NaN without a host sync.
    stats = gradient_pathology(layer_norms, vanishing_fraction=vanishing_fraction)
    any_seen = seen.any()
    out.update({key: torch.where(any_seen, stats[key].to(dtype), nan) for key in PATHOLOGY_KEYS})
    return out


def _fill_unsized(tensors: list[Tensor], fill: float = 0.0, name: str = "metric") -> list[Tensor]:
    """Give size-0 per-layer states (a rank or batch state without any update yet) the others' size.

    Used on gathered DDP states and in ``forward``'s state merge; raises ``ValueError`` when sized states
    disagree on the number of layers.

    Example:
        >>> _fill_unsized([torch.zeros(0), torch.ones(2)])
        [tensor([0., 0.]), tensor([1., 1.])]
    """
    sized = {tuple(t.shape) for t in tensors if t.numel() > 0}
    if len(sized) > 1:
        raise ValueError(f"{name} ranks saw different numbers of layers: {sorted(s[0] for s in sized)}")
    if not sized or all(t.numel() > 0 for t in tensors):
        return tensors
    (shape,) = sized
    return [t if t.numel() > 0 else t.new_full(shape, fill) for t in tensors]


def _sensitivity_update(
    theta_max: Tensor, b_bar: Tensor, proj_norm: Tensor, tau: float | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-layer ``theta_max / tau``, B̄ and G with non-finite entries set to -inf, and their count.

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
    sensitivity = sensitivity_proxy(t, b, g)
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
