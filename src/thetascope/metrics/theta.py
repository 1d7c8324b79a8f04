"""Metrics over attention rows: the balanced-mass factor theta and the attention entropy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from thetascope.functional.theta import MAX_EXACT_TOP, ThetaBounds, attention_entropy, balanced_mass_factor
from thetascope.functional.theta_stats import (
    ENTROPY_INCREMENT_OPS,
    THETA_INCREMENT_OPS,
    _entropy_compute,
    _entropy_update,
    _theta_compute,
    _theta_update,
)

__all__ = ["AttentionEntropy", "BalancedMassFactor"]

_PlotValue = dict[str, Tensor] | Sequence[dict[str, Tensor]] | None


def _accumulate(metric: Metric, inc: NamedTuple, ops: Mapping[str, str]) -> None:
    """Merge the increments ``inc`` into ``metric``'s states of the same names, each by its op in ``ops``."""
    for name, value in zip(inc._fields, inc):
        state = getattr(metric, name)
        value = value.to(state.dtype)
        if ops[name] == "sum":
            state += value  # in place: the state tensor stays the one torchmetrics registered
        else:
            setattr(metric, name, (torch.maximum if ops[name] == "max" else torch.minimum)(state, value))


def _select(val: dict[str, Tensor] | Sequence[dict[str, Tensor]], keys: Sequence[str]) -> Any:
    """Keep the plotted keys (drop row counts, which live on another scale)."""
    if isinstance(val, dict):
        return {k: val[k] for k in keys if k in val}
    return [{k: v[k] for k in keys if k in v} for v in val]


class BalancedMassFactor(Metric):
    """Distribution of the balanced-mass factor theta over attention rows, across batches and ranks.

    theta(p) / tau is the exact l_inf -> l_1 norm of the softmax Jacobian at row p (paper Thm 4.2). Each row
    is bracketed by :func:`thetascope.functional.balanced_mass_factor`; the metric keeps only reducible
    states, so every value is the same in one process as after a DDP reduction (``p10`` to ``1 / n_bins``).
    Rows whose bracket is not finite (NaN/inf input, fully masked rows) are counted in ``n_nonfinite`` and
    left out of everything else.

    ``compute()`` returns a dict of 0-dim tensors:

    * ``max``: largest certified upper bound; ``max_lower``: largest lower bound (the true max lies between),
    * ``mean``: mean of the bracket midpoints; ``p10``: their 10th percentile, from a fixed ``n_bins``
      histogram on [0, 1] (within one bin width of the exact percentile),
    * ``frac_ge_threshold``: fraction of rows whose certified lower bound is >= ``threshold``,
    * ``max_width``: widest bracket,
    * ``n_rows`` (rows used) and ``n_nonfinite`` (rows excluded), long.

    All values are NaN before any valid row (torchmetrics also warns when ``compute`` precedes ``update``).

    Args:
        exact_top: entries enumerated exactly per row, 1..20 (see ``balanced_mass_factor``).
        threshold: level of ``frac_ge_threshold``, in [0, 1].
        validate: check ``probs`` rows in ``update`` (one host sync) and raise ``ValueError`` on bad input.
        n_bins: histogram bins on [0, 1] for ``p10``.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> import torch
        >>> metric = BalancedMassFactor()
        >>> metric.update(torch.tensor([[0.4, 0.1, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1]]))
        >>> out = metric.compute()
        >>> out["max"], out["mean"], out["frac_ge_threshold"]
        (tensor(1.), tensor(0.9200), tensor(0.5000))
    """

    # theta near 1 is maximal softmax sensitivity but also diffuse attention: neither direction is "better".
    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    n_rows: Tensor
    n_nonfinite: Tensor
    sum_mid: Tensor
    max_upper: Tensor
    max_lower: Tensor
    max_width: Tensor
    n_ge_threshold: Tensor
    histogram: Tensor

    def __init__(
        self,
        exact_top: int = 10,
        threshold: float = 0.99,
        validate: bool = True,
        n_bins: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (
            isinstance(exact_top, bool)
            or not isinstance(exact_top, int)
            or not 1 <= exact_top <= MAX_EXACT_TOP
        ):
            raise ValueError(f"exact_top must be an int in [1, {MAX_EXACT_TOP}], got {exact_top!r}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold <= 1.0
        ):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        if not isinstance(validate, bool):
            raise ValueError(f"validate must be True or False, got {validate!r}")
        self.exact_top = exact_top
        self.threshold = float(threshold)
        self.validate = bool(validate)
        self.n_bins = n_bins
        self.add_state("n_rows", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_nonfinite", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sum_mid", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("max_upper", torch.tensor(-math.inf), dist_reduce_fx="max")
        self.add_state("max_lower", torch.tensor(-math.inf), dist_reduce_fx="max")
        self.add_state("max_width", torch.tensor(-math.inf), dist_reduce_fx="max")
        self.add_state("n_ge_threshold", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("histogram", torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor | None = None, *, bounds: ThetaBounds | None = None) -> None:
        """Add probability rows ``[..., L]``, or precomputed brackets (``bounds=``), exactly one of the two.

        Raises:
            ValueError: neither or both given; or bad ``probs`` (from ``balanced_mass_factor``).
        """
        if (probs is None) == (bounds is None):
            raise ValueError("pass exactly one of probs (rows [..., L]) or bounds (a ThetaBounds)")
        if bounds is None:
            assert probs is not None
            bounds = balanced_mass_factor(probs, exact_top=self.exact_top, validate=self.validate)
        _accumulate(self, _theta_update(bounds, self.threshold, self.n_bins), THETA_INCREMENT_OPS)

    def update_bounds(self, bounds: ThetaBounds) -> None:
        """Add precomputed brackets of any shape (e.g. a probe's ``LayerRecord.theta``); NaN rows are counted.

        Example:
            >>> import torch
            >>> from thetascope.functional import ThetaBounds
            >>> metric = BalancedMassFactor()
            >>> nan = float("nan")
            >>> metric.update_bounds(ThetaBounds(torch.tensor([0.9, nan]), torch.tensor([0.95, nan])))
            >>> metric.compute()["n_nonfinite"]
            tensor(1)
        """
        self.update(bounds=bounds)

    def compute(self) -> dict[str, Tensor]:
        """See the class docstring for the keys."""
        return _theta_compute(
            self.n_rows,
            self.n_nonfinite,
            self.sum_mid,
            self.max_upper,
            self.max_lower,
            self.max_width,
            self.n_ge_threshold,
            self.histogram,
        )

    def plot(self, val: _PlotValue = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot the theta values of one ``compute()`` result, or of a list of them as a time series.

        Needs matplotlib. Row counts are left out (another scale).

        Example:
            >>> import torch
            >>> metric = BalancedMassFactor()
            >>> metric.update(torch.softmax(torch.randn(8, 16), dim=-1))
            >>> fig, ax = metric.plot()  # doctest: +SKIP
        """
        val = val if val is not None else self.compute()
        keys = ("max", "max_lower", "mean", "p10", "frac_ge_threshold", "max_width")
        return self._plot(_select(val, keys), ax=ax)


class AttentionEntropy(Metric):
    """Mean, min and max Shannon entropy (nats) of attention rows, accumulated across batches and ranks.

    Rows whose entropy is not finite (NaN/inf input, fully masked rows) are counted in ``n_nonfinite`` and
    left out. ``compute()`` returns ``mean``, ``min``, ``max`` (NaN before any valid row), ``n_rows`` and
    ``n_nonfinite``.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = AttentionEntropy()
        >>> metric.update(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        >>> out = metric.compute()
        >>> out["mean"], out["max"]
        (tensor(0.3466), tensor(0.6931))
    """

    # Low entropy (collapsed attention) and high entropy (uniform attention) can both signal trouble.
    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0

    n_rows: Tensor
    n_nonfinite: Tensor
    sum_entropy: Tensor
    min_entropy: Tensor
    max_entropy: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("n_rows", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_nonfinite", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sum_entropy", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("min_entropy", torch.tensor(math.inf), dist_reduce_fx="min")
        self.add_state("max_entropy", torch.tensor(-math.inf), dist_reduce_fx="max")

    def update(self, probs: Tensor | None = None, *, entropy: Tensor | None = None) -> None:
        """Add probability rows ``[..., L]``, or precomputed per-row entropies (``entropy=``), exactly one.

        Raises:
            ValueError: neither or both given; or bad ``probs`` (from ``attention_entropy``).
        """
        if (probs is None) == (entropy is None):
            raise ValueError("pass exactly one of probs (rows [..., L]) or entropy (per-row values)")
        if entropy is None:
            assert probs is not None
            entropy = attention_entropy(probs)
        _accumulate(self, _entropy_update(entropy), ENTROPY_INCREMENT_OPS)

    def update_entropy(self, entropy: Tensor) -> None:
        """Add precomputed per-row entropies of any shape (e.g. a probe's ``LayerRecord.entropy``).

        Example:
            >>> import torch
            >>> metric = AttentionEntropy()
            >>> metric.update_entropy(torch.tensor([0.5, 1.5]))
            >>> metric.compute()["mean"]
            tensor(1.)
        """
        self.update(entropy=entropy)

    def compute(self) -> dict[str, Tensor]:
        """See the class docstring for the keys."""
        return _entropy_compute(
            self.n_rows, self.n_nonfinite, self.sum_entropy, self.min_entropy, self.max_entropy
        )

    def plot(self, val: _PlotValue = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot mean/min/max entropy of one ``compute()`` result or of a list of them (needs matplotlib).

        Example:
            >>> import torch
            >>> metric = AttentionEntropy()
            >>> metric.update(torch.softmax(torch.randn(8, 16), dim=-1))
            >>> fig, ax = metric.plot()  # doctest: +SKIP
        """
        val = val if val is not None else self.compute()
        return self._plot(_select(val, ("mean", "min", "max")), ax=ax)
