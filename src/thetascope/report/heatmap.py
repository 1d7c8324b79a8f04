"""Per-layer values over measurement steps, rendered as a layer x step image for loggers that take images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["HeatmapHistory"]


class HeatmapHistory:
    """Per-layer values over measurement steps (host memory, bounded), rendered as a layer x step image.

    Example:
        >>> h = HeatmapHistory(max_steps=4)
        >>> for s in range(6):
        ...     h.append(s, [0.1 * s, 0.2, 0.3])
        >>> h.image(cell=2).shape
        (6, 8, 3)
    """

    def __init__(self, max_steps: int = 256, log_scale: bool = False) -> None:
        self.max_steps = max_steps
        self.log_scale = log_scale
        self.steps: list[int] = []
        self.rows: list[list[float]] = []

    def append(self, step: int, values: Iterable[float]) -> None:
        """Add one column (one value per layer)."""
        self.steps.append(int(step))
        self.rows.append([float(v) for v in values])
        if len(self.steps) > self.max_steps:
            del self.steps[0], self.rows[0]

    def image(self, cell: int = 4) -> Any:
        """``uint8`` HWC RGB image, layers as rows (layer 0 on top), steps as columns; NaN drawn black."""
        import numpy as np

        arr = np.asarray(self.rows, dtype=np.float64).T  # [layers, steps]
        if self.log_scale:
            with np.errstate(divide="ignore", invalid="ignore"):
                arr = np.log10(np.where(arr > 0, arr, np.nan))
        finite = np.isfinite(arr)
        if finite.any():
            lo, hi = float(arr[finite].min()), float(arr[finite].max())
            scaled = (arr - lo) / (hi - lo) if hi > lo else np.full_like(arr, 0.5)
        else:
            scaled = np.zeros_like(arr)
        scaled = np.clip(np.where(finite, scaled, 0.0), 0.0, 1.0)
        try:
            from matplotlib import colormaps

            rgb = colormaps["viridis"](scaled)[..., :3]
        except Exception:  # matplotlib is optional: grayscale
            rgb = np.repeat(scaled[..., None], 3, axis=-1)
        rgb = np.where(finite[..., None], rgb, 0.0)
        img = (rgb * 255).round().astype(np.uint8)
        return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)
