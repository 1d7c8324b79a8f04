"""thetascope.callbacks: the Lightning callbacks (the only package that imports Lightning).

* :class:`AttentionSensitivityMonitor`: theta brackets, B-bar, projection norms and sensitivity per layer.
* :class:`GradientFlowMonitor`: per-layer gradient norms, depth pathology and spike detection.
* :class:`TemperatureWarmup`: attention-temperature warmup driven by the optimizer step.
* :class:`CurvatureMonitor`: loss sharpness against the edge-of-stability threshold, traces, the Taylor check.
* :class:`SignalPropagationMonitor`: APJN across depth, its fit and verdict, DyT/Derf alpha and saturation.
"""

from thetascope.callbacks.attention import AttentionSensitivityMonitor
from thetascope.callbacks.curvature import CurvatureMonitor
from thetascope.callbacks.gradients import GradientFlowMonitor
from thetascope.callbacks.signal import SignalPropagationMonitor
from thetascope.callbacks.temperature import TemperatureWarmup

__all__ = [
    "AttentionSensitivityMonitor",
    "CurvatureMonitor",
    "GradientFlowMonitor",
    "SignalPropagationMonitor",
    "TemperatureWarmup",
]
