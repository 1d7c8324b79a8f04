"""torchmetrics ``Metric`` classes over :mod:`thetascope.functional`, holding only DDP-reducible states.

* :class:`BalancedMassFactor`: distribution of theta over attention rows (max, certified band, mean, p10,
  fraction >= threshold, bracket width, row counts).
* :class:`AttentionEntropy`: mean/min/max attention entropy (nats).
* :class:`GradientFlow`: per-layer RMS gradient norms, global norm and depth-pathology statistics.
* :class:`SensitivityProxy`: per-layer S = (theta_max / tau) · B̄² · G from the maxima of its factors.
"""

from thetascope.metrics.gradients import GradientFlow
from thetascope.metrics.sensitivity import SensitivityProxy
from thetascope.metrics.theta import AttentionEntropy, BalancedMassFactor

__all__ = ["AttentionEntropy", "BalancedMassFactor", "GradientFlow", "SensitivityProxy"]
