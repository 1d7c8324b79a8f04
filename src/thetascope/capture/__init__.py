"""thetascope.capture: find attention modules in a model, observe their attention rows, apply a temperature.

Framework-free (no Lightning import). Main entry point: :class:`AttentionProbe`. Custom attention modules are
supported by subclassing :class:`AttentionAdapter` and decorating it with :func:`register_adapter`.
"""

from __future__ import annotations

import contextlib
import importlib

from thetascope.capture.adapters import (
    AttentionAdapter,
    CallContext,
    DualRouteAdapter,
    register_adapter,
    registered_adapters,
    sdpa_sampled_logits,
    unregister_adapter,
)
from thetascope.capture.records import LayerRecord, ProjectionWeights

# Built-in adapters register themselves on import (the optional ones only when their module exists).
for _mod in ("generic", "hf", "torch_mha", "timm_vit"):
    with contextlib.suppress(ImportError):  # an optional adapter module may be absent
        importlib.import_module(f"thetascope.capture.{_mod}")

from thetascope.capture.probe import AttentionProbe  # noqa: E402

__all__ = [
    "AttentionAdapter",
    "AttentionProbe",
    "CallContext",
    "DualRouteAdapter",
    "LayerRecord",
    "ProjectionWeights",
    "register_adapter",
    "registered_adapters",
    "sdpa_sampled_logits",
    "unregister_adapter",
]
