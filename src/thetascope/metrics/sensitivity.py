"""Metric over per-layer sensitivity-proxy inputs: S_l = (theta_max / tau) · B̄² · G_l, DDP-reducible."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from thetascope.functional.theta_stats import _sensitivity_compute, _sensitivity_update
from thetascope.metrics._functional import _fill_unsized

__all__ = ["SensitivityProxy"]

_PER_LAYER_STATES = ("max_theta_over_tau", "max_b_bar", "max_proj_norm")


class SensitivityProxy(Metric):
    """Per-layer sensitivity proxy ``S_l = (theta_max / tau) · B̄_l² · G_l`` (paper App. E.5) over an interval.

    Each ``update(theta_max, b_bar, proj_norm, tau)`` takes one measurement of every layer (``[N]`` each):
    the largest certified theta upper bound, the input magnitude B̄ (largest token 2-norm of the attention
    input) and the projection product G. The metric keeps the per-layer maxima of ``theta_max / tau``, B̄ and
    G (max-reduced across updates and ranks), so ``compute()`` is the same in one process as over DDP ranks
    that each saw part of the batch. When G and tau change between updates, the result is an upper bound on
    every update's S (the factors' maxima may come from different updates).

    ``compute()`` returns ``sensitivity`` ``[N]``, ``sensitivity_max`` (0-dim, over layers), the factors
    ``theta_over_tau``, ``b_bar`` and ``proj_norm`` (``[N]`` each) and ``n_nonfinite``. Non-finite inputs are
    counted and left out; a layer without any finite value is NaN (so is everything before any update).

    Args:
        num_layers: fix ``N`` up front; ``None`` sizes the states at the first update.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = SensitivityProxy()
        >>> theta_max, b_bar = torch.tensor([0.5, 1.0]), torch.tensor([2.0, 1.0])
        >>> metric.update(theta_max, b_bar, proj_norm=torch.tensor([3.0, 1.0]), tau=2.0)
        >>> metric.compute()["sensitivity"]
        tensor([3.0000, 0.5000])
    """

    # A lower S means a less sensitive (more stable) attention layer.
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_legend_name = "Layer"

    max_theta_over_tau: Tensor
    max_b_bar: Tensor
    max_proj_norm: Tensor
    n_nonfinite: Tensor

    def __init__(self, num_layers: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_layers is not None and (
            isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
        ):
            raise ValueError(f"num_layers must be a positive int or None, got {num_layers!r}")
        self.num_layers = num_layers
        n = num_layers or 0
        for name in _PER_LAYER_STATES:
            self.add_state(name, torch.full((n,), -torch.inf), dist_reduce_fx="max")
        self.add_state("n_nonfinite", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, theta_max: Tensor, b_bar: Tensor, proj_norm: Tensor, tau: float | Tensor = 1.0) -> None:
        """Add one measurement of every layer: ``theta_max``, ``b_bar``, ``proj_norm`` ``[N]``, and ``tau``.

        Raises:
            ValueError: shapes differ or are not 1-D, ``N`` differs from earlier updates, or ``tau`` (a float)
                is not finite and positive.
        """
        theta_over_tau, b, g, nonfinite = _sensitivity_update(theta_max, b_bar, proj_norm, tau)
        n_new, n_old = theta_over_tau.shape[0], self.max_b_bar.shape[0]
        if n_old == 0 and self.num_layers is None:
            for name in _PER_LAYER_STATES:
                setattr(self, name, getattr(self, name).new_full((n_new,), -torch.inf))
        elif n_new != n_old:
            raise ValueError(
                f"SensitivityProxy got {n_new} layers, but it holds {n_old} layers from "
                f"{'num_layers' if self.num_layers is not None else 'earlier updates'}; "
                "call reset() to change"
            )
        for name, value in zip(_PER_LAYER_STATES, (theta_over_tau, b, g)):
            state = getattr(self, name)
            setattr(self, name, torch.maximum(state, value.to(state.dtype)))
        self.n_nonfinite += nonfinite

    def compute(self) -> dict[str, Tensor]:
        """See the class docstring for the keys."""
        return _sensitivity_compute(
            self.max_theta_over_tau, self.max_b_bar, self.max_proj_norm, self.n_nonfinite
        )

    # Size-0 per-layer states (no num_layers, no update yet) must still reduce against sized ones.
    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        def gather(tensor: Tensor, *args: Any, **kwargs: Any) -> list[Tensor]:
            return _fill_unsized(
                dist_sync_fn(tensor, *args, **kwargs), fill=-torch.inf, name="SensitivityProxy"
            )

        super()._sync_dist(gather, process_group)

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        incoming = dict(incoming_state)
        for name in _PER_LAYER_STATES:
            incoming[name], local = _fill_unsized(
                [incoming[name], getattr(self, name)], fill=-torch.inf, name="SensitivityProxy"
            )
            setattr(self, name, local)
        super()._reduce_states(incoming)

    def plot(
        self, val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Plot per-layer S of one ``compute()`` result, or one line per layer over a list of them.

        Example:
            >>> import torch
            >>> metric = SensitivityProxy()
            >>> metric.update(torch.tensor([0.9, 1.0]), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0]))
            >>> fig, ax = metric.plot()  # doctest: +SKIP
        """
        val = val if val is not None else self.compute()
        if isinstance(val, dict):
            return self._plot(val["sensitivity"], ax=ax)
        return self._plot([v["sensitivity"] for v in val], ax=ax)
