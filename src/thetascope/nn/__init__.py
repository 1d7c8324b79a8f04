"""thetascope.nn: normalisation-free drop-in replacements for LayerNorm.

* :class:`DyT`: Dynamic Tanh, ``weight * tanh(alpha * x) + bias``.
* :class:`Derf`: Dynamic erf, ``weight * erf(alpha * x + shift) + bias``.
* :func:`convert_layernorm`: replace every ``nn.LayerNorm`` of a model by one of them, in place.
"""

from thetascope.nn.dynamic import NORM_KINDS, Derf, DyT, convert_layernorm, is_tanh_like

__all__ = ["NORM_KINDS", "Derf", "DyT", "convert_layernorm", "is_tanh_like"]
