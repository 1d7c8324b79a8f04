"""Cached constants (ranges, scalars) per device, shared by the bracket and the capture adapters."""

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


_SCALARS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def cached_scalar(value: float, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A 0-dim tensor holding ``value``, one per (value, dtype, device) (read-only: shared).

    For the ops whose scalar overloads are slower on CPU than their tensor ones (``scatter_``) or missing
    (``torch.where`` with ``out``); expanded, it is a constant of any shape without memory.

    Example:
        >>> cached_scalar(0.0, torch.float32, "cpu").expand(2, 2)
        tensor([[0., 0.],
                [0., 0.]])
    """
    device = torch.device(device)
    key = (value, dtype, device)
    t = _SCALARS.get(key)
    if t is None:
        with torch.inference_mode(False):  # usable outside inference mode after a first call inside it
            t = _SCALARS[key] = torch.full((), value, dtype=dtype, device=device)
    return t


def mask_logits_(logits: Tensor, masked: Tensor) -> Tensor:
    """``logits.masked_fill_(masked, -inf)`` as one ``torch.where`` into ``logits`` (on CPU about two thirds
    of the time of ``masked_fill_``); ``masked`` broadcasts to the shape of ``logits``.

    Example:
        >>> mask_logits_(torch.zeros(2), torch.tensor([False, True]))
        tensor([0., -inf])
    """
    fill = cached_scalar(float("-inf"), logits.dtype, logits.device)
    return torch.where(masked, fill, logits, out=logits)
