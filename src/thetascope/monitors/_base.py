"""The contract every monitor core follows, so callbacks and integrations wire them all the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from thetascope.monitors._collective import AllGather, local_all_gather

__all__ = ["MonitorCore"]


@runtime_checkable
class MonitorCore(Protocol):
    """A framework-free monitor: ``measure`` into device tensors, ``reduce`` with one collective, its state.

    ``measure`` differs per monitor (what it needs: a captured forward, the optimizer, a batch), so it is not
    part of the protocol. ``reduce`` takes the partial values one rank measured and returns the values to log,
    keyed by their full key (``thetascope.keys``), equal on every rank; it is the only place that syncs.
    """

    def reduce(
        self, values: Mapping[str, Tensor], all_gather: AllGather = local_all_gather
    ) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
