"""thetascope.monitors: framework-free monitor cores, drivable from a plain PyTorch loop.

Each core takes the model (and the optimizer where it needs one), measures into device tensors without a host
sync, reduces through a collective it is given (:data:`~thetascope.monitors._collective.AllGather`), and
keeps its resumable state in ``state_dict``/``load_state_dict``. The Lightning callbacks only wire them.

* :class:`AttentionMonitor`: theta brackets, B-bar, projection norms and sensitivity per attention layer.
* :class:`GradientFlowCore`: per-layer gradient norms, depth pathology, gradient and loss spikes.
* :class:`TemperatureController`: the attention temperature as a function of the optimizer step.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "AttentionMonitor": "thetascope.monitors.attention",
    "GradientFlowCore": "thetascope.monitors.gradient",
    "MonitorCore": "thetascope.monitors._base",
    "TemperatureController": "thetascope.monitors.temperature",
    "AllGather": "thetascope.monitors._collective",
    "distributed_all_gather": "thetascope.monitors._collective",
    "local_all_gather": "thetascope.monitors._collective",
}

__all__ = [
    "AllGather",
    "AttentionMonitor",
    "GradientFlowCore",
    "MonitorCore",
    "TemperatureController",
    "distributed_all_gather",
    "local_all_gather",
]

if TYPE_CHECKING:
    from thetascope.monitors._base import MonitorCore
    from thetascope.monitors._collective import AllGather, distributed_all_gather, local_all_gather
    from thetascope.monitors.attention import AttentionMonitor
    from thetascope.monitors.gradient import GradientFlowCore
    from thetascope.monitors.temperature import TemperatureController


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thetascope.monitors' has no attribute {name!r}")
