"""One :class:`~thetascope.capture.AttentionProbe` per model, shared by the monitors and the temperature."""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from thetascope.capture.introspect import unwrap_compiled

if TYPE_CHECKING:
    from thetascope.capture.probe import AttentionProbe

__all__ = ["shared_probe", "unwrap_compiled"]

# model -> weak reference to its probe. The callbacks hold the probe; the probe holds the model. Holding the
# probe strongly here would keep every model ever fitted alive for the life of the process (the value would
# reference its own weak key), which a sweep or a notebook running many fits would notice.
_PROBES: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[AttentionProbe]] = weakref.WeakKeyDictionary()


def shared_probe(module: torch.nn.Module, **settings: Any) -> AttentionProbe:
    """The :class:`~thetascope.capture.AttentionProbe` of ``module`` (compiled wrappers unwrapped), made once.

    The temperature and attention monitors use the same probe, so the measured rows are those of the tempered
    logits and only one set of hooks is ever installed. ``settings`` (``rows_per_head``, ``batch_size``,
    ``exact_top``, ``seed``) update the sampling of an existing probe; they do not affect the temperature.
    """
    from thetascope.capture.probe import AttentionProbe

    key = unwrap_compiled(module)
    ref = _PROBES.get(key)
    probe = ref() if ref is not None else None
    if probe is None:
        probe = AttentionProbe(key, **settings)
        _PROBES[key] = weakref.ref(probe)
    else:
        probe = _refreshed(key, probe)
        for name, value in settings.items():
            setattr(probe, name, value)
    return probe


def _refreshed(model: torch.nn.Module, probe: AttentionProbe) -> AttentionProbe:
    """``probe``, or a new probe when the model's attention modules changed since it was built.

    Blocks added, removed or replaced between two ``fit`` calls would otherwise go unmeasured, or keep
    reporting the last values of a module that is gone. The new probe keeps the sampling settings and tau.
    """
    from thetascope.capture.probe import AttentionProbe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # discovery warnings were given when the first probe was built
        try:
            fresh = AttentionProbe(
                model,
                rows_per_head=probe.rows_per_head,
                heads=probe.heads,
                batch_size=probe.batch_size,
                seed=probe.seed,
                exact_top=probe.exact_top,
            )
        except ValueError:  # no attention left, or heads= no longer fits: keep the old probe
            return probe
    same = [(r.index, c.adapter.module) for r, c in zip(fresh.layers, fresh._contexts)] == [
        (r.index, c.adapter.module) for r, c in zip(probe.layers, probe._contexts)
    ]
    if same:
        return probe
    tau = probe.temperature
    probe.remove()
    if tau != 1.0:
        fresh.set_temperature(tau)
    _PROBES[model] = weakref.ref(fresh)
    return fresh
