"""One cached ``arange`` per device, shared by the bracket and the capture adapters (pure torch)."""

from __future__ import annotations

import torch
from torch import Tensor

# 0, 1, 2, ... by device: never written, so one tensor (grown as needed) serves every caller.
_RANGES: dict[torch.device, Tensor] = {}


def cached_arange(n: int, device: torch.device | str) -> Tensor:
    """``torch.arange(n, device=device)`` as a view of one cached range per device (read-only: shared).

    Example:
        >>> cached_arange(3, "cpu")
        tensor([0, 1, 2])
    """
    device = torch.device(device)
    t = _RANGES.get(device)
    if t is None or t.numel() < n:
        with torch.inference_mode(False):  # usable outside inference mode after a first call inside it
            t = _RANGES[device] = torch.arange(max(n, 2 * (0 if t is None else t.numel())), device=device)
    return t[:n]
