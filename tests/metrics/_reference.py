"""Independent numpy references and deterministic data for the metric tests (no thetascope code)."""

from __future__ import annotations

import numpy as np
import torch


def theta_exhaustive(rows: np.ndarray) -> np.ndarray:
    """theta(p) = max over all subsets S of 4 p(S) (1 - p(S)), by enumerating 2**L subsets in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    n_keys = rows.shape[-1]
    codes = np.arange(1 << n_keys)
    bits = ((codes[:, None] >> np.arange(n_keys)[None, :]) & 1).astype(np.float64)  # [2**L, L]
    sums = rows.reshape(-1, n_keys) @ bits.T  # [N, 2**L]
    return (4.0 * sums * (1.0 - sums)).max(axis=-1).reshape(rows.shape[:-1])


def entropy_nats(rows: np.ndarray) -> np.ndarray:
    """-sum p log p with 0 log 0 = 0; NaN for a row with a NaN entry."""
    rows = np.asarray(rows, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(
            rows > 0, -rows * np.log(np.where(rows > 0, rows, 1.0)), np.where(rows == 0, 0.0, np.nan)
        )
    return terms.sum(axis=-1)


def mixed_rows(n: int, n_keys: int, seed: int) -> torch.Tensor:
    """Probability rows [n, n_keys] (float64) mixing diffuse rows (theta ~ 1), peaked ones and one-hots."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 6.0
    rows = torch.softmax(torch.randn(n, n_keys, generator=gen, dtype=torch.float64) * scale, dim=-1)
    if n >= 4:
        rows[0] = 0.0
        rows[0, 0] = 1.0  # one-hot: theta = 0
        rows[1] = 1.0 / n_keys  # uniform
    return rows
