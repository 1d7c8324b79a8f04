"""One collective per measurement: named values packed into one vector, reduced per entry with its own op.

Framework-free: the cores take an :data:`AllGather` callable (``[K] -> [world, K]``), so a plain loop passes
:func:`distributed_all_gather` (or nothing, in one process) and the Lightning callbacks pass the strategy's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "REDUCE_OPS",
    "AllGather",
    "PackedValues",
    "distributed_all_gather",
    "local_all_gather",
    "reduce_gathered",
    "reduce_packed",
]

#: Cross-rank reductions understood by :func:`reduce_packed`.
REDUCE_OPS: tuple[str, ...] = ("mean", "max", "sum", "min")
_OP_CODE = {op: i for i, op in enumerate(REDUCE_OPS)}

#: Gathers a flat ``[K]`` vector from every rank into ``[world, K]`` (every rank calls it with the same K).
AllGather = Callable[[Tensor], Tensor]


def local_all_gather(vec: Tensor) -> Tensor:
    """The single-process :data:`AllGather`: ``[K] -> [1, K]``."""
    return vec.unsqueeze(0)


def distributed_all_gather(group: object | None = None) -> AllGather:
    """An :data:`AllGather` over a ``torch.distributed`` process group (the default group for ``None``).

    Falls back to :func:`local_all_gather` when ``torch.distributed`` is not initialised.
    """

    def gather(vec: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return local_all_gather(vec)
        world = dist.get_world_size(group)  # type: ignore[arg-type]
        out = [torch.empty_like(vec) for _ in range(world)]
        dist.all_gather(out, vec.contiguous(), group=group)
        return torch.stack(out)

    return gather


class PackedValues:
    """Named 0-dim / 1-dim tensors packed into one flat float32 vector, with a reduction op per entry.

    Build it on every rank in the same order (the layout must match across ranks), call :func:`gather_reduce`
    once, then :meth:`unpack` the result.

    Example:
        >>> p = PackedValues()
        >>> p.add("a", torch.tensor(1.0), "max"); p.add("b", torch.tensor([2.0, 3.0]), "mean")
        >>> p.unpack(p.vector())["b"].tolist()
        [2.0, 3.0]
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._shapes: list[tuple[int, ...]] = []
        self._values: list[Tensor] = []
        self._ops: list[int] = []

    def add(self, name: str, value: Tensor | float, op: str = "mean") -> None:
        """Append ``value`` (any shape, flattened) under ``name``, reduced across ranks with ``op``."""
        if op not in _OP_CODE:
            raise ValueError(f"op must be one of {list(REDUCE_OPS)}, got {op!r}")
        t = value if isinstance(value, Tensor) else torch.tensor(float(value))
        self._names.append(name)
        self._shapes.append(tuple(t.shape))
        self._values.append(t.detach().reshape(-1).float())
        self._ops.extend([_OP_CODE[op]] * t.numel())

    def __len__(self) -> int:
        return len(self._ops)

    def vector(self, device: torch.device | None = None) -> Tensor:
        """The flat float32 vector (on ``device``, or the first value's device)."""
        if not self._values:
            return torch.zeros(0, device=device)
        dev = device if device is not None else self._values[0].device
        return torch.cat([v.to(dev) for v in self._values])

    def ops(self) -> Tensor:
        """Op code per entry (index into :data:`REDUCE_OPS`)."""
        return torch.tensor(self._ops, dtype=torch.long)

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a reduced vector back into the named tensors (original shapes)."""
        out: dict[str, Tensor] = {}
        start = 0
        for name, shape in zip(self._names, self._shapes):
            n = math.prod(shape)
            out[name] = flat[start : start + n].reshape(shape)
            start += n
        return out


def reduce_gathered(gathered: Tensor, ops: Tensor) -> Tensor:
    """Reduce ``[world, K]`` per column; mean/max/min ignore NaN (NaN only if every rank is NaN)."""
    nan = torch.isnan(gathered)
    all_nan = nan.all(0)
    mean = torch.nanmean(gathered, dim=0)
    mx = gathered.masked_fill(nan, -math.inf).amax(0)
    mn = gathered.masked_fill(nan, math.inf).amin(0)
    sm = gathered.sum(0)
    ops = ops.to(gathered.device)
    out = torch.where(ops == 0, mean, torch.where(ops == 1, mx, torch.where(ops == 2, sm, mn)))
    return torch.where(all_nan & (ops != 2), torch.full_like(out, math.nan), out)


def reduce_packed(
    packed: PackedValues, all_gather: AllGather = local_all_gather, device: torch.device | None = None
) -> Tensor:
    """Reduce a :class:`PackedValues` across ranks with ONE collective and return the reduced vector (CPU).

    A single ``all_gather`` of the packed vector lets every entry use its own op (mean, max, min or sum); an
    ``all_reduce`` would need one collective per op. Every rank must call this with the same layout; it syncs
    the host (measurement steps only).
    """
    vec = packed.vector(device)
    gathered = all_gather(vec).reshape(-1, vec.numel())
    return reduce_gathered(gathered.detach().float().cpu(), packed.ops())
