"""Private update/compute pairs of the gradient-flow metric and the state merge of per-layer metrics.

Each ``_<name>_update`` turns one batch into additive (or max/min) state increments; each ``_<name>_compute``
turns accumulated states into the reported values. The metric classes only hold the states, so the same math
runs in one process or after a DDP reduction of the states. The attention statistics (theta, entropy, S_l)
live in :mod:`thetascope.functional.theta_stats`, shared with the attention monitor core.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from thetascope.functional.gradients import gradient_pathology

# Keys of ``gradient_pathology``; used to report NaN for each before any layer norm has been seen.
PATHOLOGY_KEYS: tuple[str, ...] = (
    "early_late_ratio",
    "log_slope",
    "vanishing_layers",
    "min_max_ratio",
    "argmin_layer",
)


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
