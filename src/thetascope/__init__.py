"""thetascope: exact attention-sensitivity and gradient-flow diagnostics for transformer training.

The math (:mod:`thetascope.functional`) and the capture core (:mod:`thetascope.capture`) are framework-free;
the Lightning callbacks are imported lazily so ``import thetascope.functional`` never pulls in Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AttentionSensitivityMonitor": "thetascope.callbacks",
    "GradientFlowMonitor": "thetascope.callbacks",
    "TemperatureWarmup": "thetascope.callbacks",
    "AttentionProbe": "thetascope.capture",
    "TemperatureSchedule": "thetascope.schedules",
    "ThetaBounds": "thetascope.functional",
    "balanced_mass_factor": "thetascope.functional",
}

__all__ = [
    "AttentionProbe",
    "AttentionSensitivityMonitor",
    "GradientFlowMonitor",
    "TemperatureSchedule",
    "TemperatureWarmup",
    "ThetaBounds",
    "__version__",
    "balanced_mass_factor",
]

if TYPE_CHECKING:
    from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup
    from thetascope.capture import AttentionProbe
    from thetascope.functional import ThetaBounds, balanced_mass_factor
    from thetascope.schedules import TemperatureSchedule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thetascope' has no attribute {name!r}")
