"""Metric over per-layer gradient norms: RMS profile across updates and its pathology statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from thetascope.metrics._functional import _fill_unsized, _gradient_flow_compute, _gradient_flow_update

__all__ = ["GradientFlow"]

_PER_LAYER_STATES = ("sum_squares", "count")


class GradientFlow(Metric):
    """Per-layer gradient-norm profile (RMS over updates) and its depth pathology, DDP-reducible.

    Each ``update(layer_norms)`` takes one vector ``[N]`` of per-layer gradient norms (e.g. from
    :func:`thetascope.functional.grad_norms_by_group`). The metric keeps the per-layer sum of squares and
    count of finite values, so ``compute()`` gives, over all updates (and ranks):

    * ``layer_norms`` ``[N]``: root mean square of each layer's norm over the updates (NaN for a layer that
      was never finite),
    * ``global_norm``: ``sqrt(sum_l layer_norms_l**2)`` (the RMS of the global norm when all were finite),
    * ``early_late_ratio``, ``log_slope``, ``vanishing_layers``, ``min_max_ratio``, ``argmin_layer``: from
      :func:`thetascope.functional.gradient_pathology` on ``layer_norms``,
    * ``n_nonfinite``: non-finite entries seen (left out of the sums).

    ``N`` is fixed by ``num_layers`` or by the first update; a later update with another ``N`` raises
    ``ValueError``. Before any update every value is NaN (with ``num_layers`` given, ``layer_norms`` is
    ``[N]`` NaN; otherwise ``[0]``). The pathology statistics are returned as floats (NaN when undefined).

    Args:
        vanishing_fraction: passed to ``gradient_pathology`` (a layer "vanishes" below this fraction of
            the max).
        num_layers: fix ``N`` up front (states preallocated); ``None`` sizes them at the first update.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = GradientFlow()
        >>> metric.update(torch.tensor([3.0, 4.0]))
        >>> metric.update(torch.tensor([3.0, 4.0]))
        >>> out = metric.compute()
        >>> out["layer_norms"], out["global_norm"]
        (tensor([3., 4.]), tensor(5.))
    """

    # Large (exploding) and small (vanishing) gradients are both pathological.
    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_legend_name = "Layer"

    sum_squares: Tensor
    count: Tensor
    n_nonfinite: Tensor

    def __init__(
        self, vanishing_fraction: float = 0.01, num_layers: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if (
            isinstance(vanishing_fraction, bool)
            or not isinstance(vanishing_fraction, (int, float))
            or not 0.0 < vanishing_fraction < 1.0
        ):
            raise ValueError(f"vanishing_fraction must be a number in (0, 1), got {vanishing_fraction!r}")
        if num_layers is not None and (
            isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
        ):
            raise ValueError(f"num_layers must be a positive int or None, got {num_layers!r}")
        self.vanishing_fraction = float(vanishing_fraction)
        self.num_layers = num_layers
        n = num_layers or 0
        self.add_state("sum_squares", torch.zeros(n), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_nonfinite", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, layer_norms: Tensor) -> None:
        """Add one vector of per-layer gradient norms ``[N]`` (any float dtype).

        Raises:
            ValueError: ``layer_norms`` is not 1-D, is empty, or its length differs from earlier updates.
        """
        if layer_norms.dim() != 1 or layer_norms.numel() == 0:
            raise ValueError(
                f"layer_norms must be a non-empty 1-D tensor [num_layers], got {tuple(layer_norms.shape)}"
            )
        n_new = layer_norms.shape[0]
        n_old = self.sum_squares.shape[0]
        if n_old == 0 and self.num_layers is None:
            self.sum_squares = self.sum_squares.new_zeros(n_new)
            self.count = self.count.new_zeros(n_new)
        elif n_new != n_old:
            raise ValueError(
                f"GradientFlow got {n_new} layer norms, but it holds {n_old} layers from "
                f"{'num_layers' if self.num_layers is not None else 'earlier updates'}; "
                "call reset() to change"
            )
        squares, count, nonfinite = _gradient_flow_update(layer_norms)
        self.sum_squares += squares.to(self.sum_squares.dtype)
        self.count += count.to(self.count.dtype)
        self.n_nonfinite += nonfinite

    def compute(self) -> dict[str, Tensor]:
        """See the class docstring for the keys."""
        return _gradient_flow_compute(self.sum_squares, self.count, self.n_nonfinite, self.vanishing_fraction)

    # The per-layer states start at size 0 when num_layers is not given; a rank (or a forward() batch state)
    # that has not seen an update yet must still reduce against sized states.
    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        def gather(tensor: Tensor, *args: Any, **kwargs: Any) -> list[Tensor]:
            return _fill_unsized(dist_sync_fn(tensor, *args, **kwargs), name="GradientFlow")

        super()._sync_dist(gather, process_group)

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        incoming = dict(incoming_state)
        for name in _PER_LAYER_STATES:
            incoming[name], local = _fill_unsized([incoming[name], getattr(self, name)], name="GradientFlow")
            setattr(self, name, local)
        super()._reduce_states(incoming)

    def plot(
        self, val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Plot the per-layer RMS norms of one ``compute()`` result (one point per layer).

        A list of results gives one line per layer over time. Needs matplotlib.

        Example:
            >>> import torch
            >>> metric = GradientFlow()
            >>> metric.update(torch.tensor([0.4, 0.2, 0.1]))
            >>> fig, ax = metric.plot()  # doctest: +SKIP
        """
        val = val if val is not None else self.compute()
        if isinstance(val, dict):
            return self._plot(val["layer_norms"], ax=ax)
        return self._plot([v["layer_norms"] for v in val], ax=ax)
