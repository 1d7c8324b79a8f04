"""Model introspection: the architecture card, residual-scale detection, ``torch.compile`` detection.

Framework-free. The card summarises what the stability theory needs to know about a model: depth ``N``, norm
placement, the path length ``m`` of the sensitive attention path (Thm 6.2), the per-map scale ``N^(-1/m)`` it
recommends, and any residual-branch scaling the blocks already apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from thetascope.capture.probe import AttentionProbe
    from thetascope.capture.records import LayerRecord

__all__ = ["architecture_card", "is_compiled", "residual_scaling", "unwrap_compiled"]

# Attribute names under which residual blocks commonly keep a branch scale (DeepNorm alpha, LayerScale gamma,
# ReZero-style scalars).
_RESIDUAL_SCALE_ATTRS = (
    "scale",
    "alpha",
    "branch_scale",
    "residual_scale",
    "res_scale",
    "layer_scale",
    "gamma",
)


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile`` wrapper (``_orig_mod``), or ``module`` itself.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> unwrap_compiled(lin) is lin
        True
    """
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule is a ``torch.compile`` wrapper (whose graphs skip module hooks).

    Example:
        >>> import torch
        >>> is_compiled(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        False
    """
    return any(type(m).__name__ == "OptimizedModule" for m in module.modules())


def residual_scaling(model: nn.Module, block_names: Sequence[str | None]) -> str:
    """The residual-branch scales found on the named blocks, e.g. ``"alpha=2.449"``, or ``"not detected"``.

    A float attribute other than 1 is reported with its value; a one-element tensor (a learned scale) by
    name only.

    Example:
        >>> import torch
        >>> block = torch.nn.Module(); block.alpha = 0.5
        >>> residual_scaling(torch.nn.ModuleDict({"b": block}), ["b"])
        'alpha=0.5'
    """
    modules = dict(model.named_modules())
    scales: set[str] = set()
    for name in block_names:
        block = modules.get(name or "")
        if block is None:
            continue
        for attr in _RESIDUAL_SCALE_ATTRS:
            v = getattr(block, attr, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 1.0:
                scales.add(f"{attr}={v:.4g}")
            elif isinstance(v, Tensor) and v.numel() == 1:
                scales.add(f"{attr} (tensor)")
    return ", ".join(sorted(scales)) if scales else "not detected"


def _path_length(layers: Sequence[LayerRecord]) -> int:
    try:
        ms = sorted({int(r.path_length_m) for r in layers})
    except Exception:  # weights not readable (e.g. a custom adapter): the standard-attention value
        ms = [4]
    return ms[0] if ms else 4


def architecture_card(probe: AttentionProbe | None) -> dict[str, Any]:
    """Depth, norm placement, path length m, the recommended ``N^(-1/m)`` scale and residual scaling.

    Keys are :data:`thetascope.keys.ARCHITECTURE_CARD_FIELDS`. ``sensitivity_uses`` names the B-bar
    reading that S_l uses. With mixed norm placements, ``norm_placement`` is ``"mixed:post/pre"``; with mixed
    path lengths, the smallest m (the strictest scale) is reported.
    """
    layers = list(probe.layers) if probe is not None else []
    n = len(layers)
    placements = sorted({str(r.norm_placement) for r in layers})
    m = _path_length(layers)
    return {
        "depth": n,
        "norm_placement": placements[0] if len(placements) == 1 else "mixed:" + "/".join(placements),
        "path_length_m": m,
        "recommended_scale": n ** (-1.0 / m) if n else math.nan,
        "residual_scaling": residual_scaling(probe.model, [r.block_name for r in layers])
        if probe is not None
        else "not detected",
        "sensitivity_uses": "attn_input_max_norm",
    }
