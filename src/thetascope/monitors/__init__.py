"""thetascope.monitors: framework-free monitor cores, drivable from a plain PyTorch loop.

Each core takes the model (and the optimizer where it needs one), measures into device tensors without a host
sync, reduces through a collective it is given (:data:`~thetascope.monitors._collective.AllGather`), and
keeps its resumable state in ``state_dict``/``load_state_dict``. The Lightning callbacks only wire them.

* :class:`AttentionMonitor`: theta brackets, B-bar, projection norms and sensitivity per attention layer.
* :class:`GradientFlowCore`: per-layer gradient norms, depth pathology, gradient and loss spikes.
* :class:`TemperatureController`: the attention temperature as a function of the optimizer step.
"""

from thetascope.monitors._base import MonitorCore
from thetascope.monitors._collective import AllGather, distributed_all_gather, local_all_gather
from thetascope.monitors.attention import AttentionMonitor
from thetascope.monitors.gradient import GradientFlowCore
from thetascope.monitors.temperature import TemperatureController

__all__ = [
    "AllGather",
    "AttentionMonitor",
    "GradientFlowCore",
    "MonitorCore",
    "TemperatureController",
    "distributed_all_gather",
    "local_all_gather",
]
