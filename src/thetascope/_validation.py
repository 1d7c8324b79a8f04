"""Argument validation shared by the monitor cores and the callbacks (framework-free).

Every check raises ``ValueError`` naming the argument and what is allowed, so a bad configuration fails at
construction, not at the first measurement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_layers_arg",
    "check_open_fraction",
    "check_positive_float",
    "check_positive_int",
    "check_prefix",
    "select_layers",
]


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``, else ``ValueError`` naming it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else ``ValueError`` naming the argument and ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an ``int >= minimum`` (bools refused), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_prefix(prefix: Any) -> str:
    """Validate a key prefix (a string; ``""`` allowed)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string such as 'stability/', got {prefix!r}")
    return prefix


def check_layers_arg(layers: Any) -> str | list[int]:
    """Validate ``layers=``: ``None``/``"all"``, ``"auto"`` or a list of non-negative layer indices."""
    if layers is None or layers == "all":
        return "all"
    if layers == "auto":
        return "auto"
    if isinstance(layers, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
    ):
        return sorted(set(int(i) for i in layers))
    raise ValueError(
        f"layers must be 'all' (or None), 'auto', or a list of layer indices >= 0, got {layers!r}"
    )


def select_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Indices of the layers to log out of ``n_layers``.

    ``"all"`` gives every layer; ``"auto"`` the first, second, middle, second-last and last (deduplicated);
    a list is kept as given, and indices ``>= n_layers`` raise ``ValueError``.

    Example:
        >>> select_layers("auto", 12), select_layers("auto", 2), select_layers([0, 3], 4)
        ([0, 1, 6, 10, 11], [0, 1], [0, 3])
    """
    if spec == "all":
        return list(range(n_layers))
    if spec == "auto":
        return sorted({i for i in (0, 1, n_layers // 2, n_layers - 2, n_layers - 1) if 0 <= i < n_layers})
    chosen = [int(i) for i in spec]
    bad = [i for i in chosen if i >= n_layers]
    if bad:
        raise ValueError(
            f"layers={list(spec)} names layer(s) {bad} but the model has {n_layers} (0..{n_layers - 1})"
        )
    return chosen


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0 (bools refused), else ``ValueError`` naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_open_fraction(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in (0, 1) (bools refused), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)
