"""thetascope.callbacks: the Lightning callbacks (the only package that imports Lightning).

* :class:`AttentionSensitivityMonitor`: theta brackets, B-bar, projection norms and sensitivity per layer.
* :class:`GradientFlowMonitor`: per-layer gradient norms, depth pathology and spike detection.
* :class:`TemperatureWarmup`: attention-temperature warmup driven by the optimizer step.
"""

from thetascope.callbacks.attention import AttentionSensitivityMonitor
from thetascope.callbacks.gradients import GradientFlowMonitor
from thetascope.callbacks.signal import SignalPropagationMonitor
from thetascope.callbacks.temperature import TemperatureWarmup

__all__ = ["AttentionSensitivityMonitor", "GradientFlowMonitor", "TemperatureWarmup"]
__all__ += ["SignalPropagationMonitor"]
from thetascope.callbacks.curvature import CurvatureMonitor

__all__ += ["CurvatureMonitor"]
