"""thetascope: exact attention-sensitivity and gradient-flow diagnostics for transformer training.

The math (:mod:`thetascope.functional`), the capture core (:mod:`thetascope.capture`), the monitor cores
(:mod:`thetascope.monitors`) and the schedules are framework-free; everything here is imported lazily, so
``import thetascope.monitors`` never pulls in Lightning (only :mod:`thetascope.callbacks` does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    # Lightning callbacks
    "AttentionSensitivityMonitor": "thetascope.callbacks",
    "GradientFlowMonitor": "thetascope.callbacks",
    "TemperatureWarmup": "thetascope.callbacks",
    # framework-free monitor cores (a plain PyTorch loop, Fabric, other trainers)
    "AttentionMonitor": "thetascope.monitors",
    "GradientFlowCore": "thetascope.monitors",
    "TemperatureController": "thetascope.monitors",
    # torchmetrics metrics
    "AttentionEntropy": "thetascope.metrics",
    "BalancedMassFactor": "thetascope.metrics",
    "GradientFlow": "thetascope.metrics",
    "SensitivityProxy": "thetascope.metrics",
    # capture, math, schedules
    "AttentionProbe": "thetascope.capture",
    "register_adapter": "thetascope.capture",
    "SpikeDetector": "thetascope.functional",
    "ThetaBounds": "thetascope.functional",
    "balanced_mass_factor": "thetascope.functional",
    "TemperatureSchedule": "thetascope.schedules",
}

__all__ = [
    "AttentionEntropy",
    "AttentionMonitor",
    "AttentionProbe",
    "AttentionSensitivityMonitor",
    "BalancedMassFactor",
    "GradientFlow",
    "GradientFlowCore",
    "GradientFlowMonitor",
    "SensitivityProxy",
    "SpikeDetector",
    "TemperatureController",
    "TemperatureSchedule",
    "TemperatureWarmup",
    "ThetaBounds",
    "__version__",
    "balanced_mass_factor",
    "register_adapter",
]

if TYPE_CHECKING:
    from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup
    from thetascope.capture import AttentionProbe, register_adapter
    from thetascope.functional import SpikeDetector, ThetaBounds, balanced_mass_factor
    from thetascope.metrics import AttentionEntropy, BalancedMassFactor, GradientFlow, SensitivityProxy
    from thetascope.monitors import AttentionMonitor, GradientFlowCore, TemperatureController
    from thetascope.schedules import TemperatureSchedule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'thetascope' has no attribute {name!r}")
