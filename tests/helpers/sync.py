"""A spy for host-device synchronisation: records tensor methods that read values back to the host."""

from __future__ import annotations

from typing import Any

from torch.overrides import TorchFunctionMode

#: Tensor methods that force a device-to-host copy (a synchronisation on CUDA).
SYNCING = frozenset({"item", "__bool__", "tolist", "cpu", "__float__", "__int__", "numpy"})


class SyncSpy(TorchFunctionMode):
    """Inside ``with SyncSpy() as spy:``, ``spy.calls`` lists every syncing tensor method called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))
