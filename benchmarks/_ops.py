"""Counting the device operations a piece of code runs: kernel launches on a GPU, measured on any machine.

Unlike a time, the count is exact and the same on a shared CPU as on an idle one, so it tracks the part of a
measurement's GPU cost that comes from launching many small kernels (each costs microseconds of host time
however small it is).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# Operations that launch no kernel: allocations and the like (views are recognised by their schema;
# ``_unsafe_view``, matmul's reshape of its own fresh result, is a view that its schema does not declare).
_FREE = frozenset(
    {
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "lift_fresh",
        "_local_scalar_dense",
        "detach",
        "_unsafe_view",
    }
)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run inside the block, views and allocations excluded.

    Example:
        >>> import torch
        >>> x = torch.ones(3)
        >>> with OpCounter() as ops:
        ...     y = (x + 1).view(3, 1).t() * 2
        >>> ops.n, dict(ops.by_name)
        (2, {'add': 1, 'mul': 1})
    """

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _FREE:
            self.n += 1
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))
