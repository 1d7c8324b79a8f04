"""The key schema: every writer (monitors, callbacks, integrations) and every reader (``report/``) uses it.

Keys are ``{prefix}{field}`` for run-level values and ``{prefix}{field}/layer_XX`` for per-layer values, with
layers zero-padded to two digits. Layers of separate stacks (encoder, decoder self-attention, decoder
cross-attention) keep apart as ``{prefix}{field}/{stack}/layer_XX``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["DEFAULT_PREFIX", "layer_key"]

#: Prefix of every key unless the user passes another.
DEFAULT_PREFIX = "stability/"


def layer_key(prefix: str, name: str, index: int, stack: str | None = None) -> str:
    """``{prefix}{name}/layer_{index:02d}`` (``{prefix}{name}/{stack}/layer_{index:02d}`` with a stack).

    Example:
        >>> layer_key("stability/", "theta_max", 3)
        'stability/theta_max/layer_03'
        >>> layer_key("stability/", "theta_max", 1, stack="decoder_cross")
        'stability/theta_max/decoder_cross/layer_01'
    """
    if stack:
        return f"{prefix}{name}/{stack}/layer_{index:02d}"
    return f"{prefix}{name}/layer_{index:02d}"


# ---------------------------------------------------------------------------------- gradient, temperature
# Written by monitors.gradient.GradientFlowCore (callbacks.GradientFlowMonitor) and
# monitors.temperature.TemperatureController (callbacks.TemperatureWarmup); read by report/.

#: Per-layer fields of the gradient monitor: ``{prefix}grad_norm/layer_XX``, with the stack
#: (``{prefix}grad_norm/encoder/layer_XX``) for encoder-decoder models.
GRADIENT_LAYER_FIELDS: tuple[str, ...] = ("grad_norm",)
#: Global gradient norm of the stepped optimizer's parameters (``sqrt`` of the summed squares).
GRAD_NORM_GLOBAL = "grad_norm/global"
#: The same value under its headline name, also put into ``trainer.callback_metrics``.
GRAD_NORM_HEADLINE = "grad_norm_global"
#: Group of the depth-profile statistics: ``{prefix}grad/{field}`` for each of :data:`PATHOLOGY_FIELDS`.
PATHOLOGY_GROUP = "grad/"
#: Depth-profile statistics of the per-layer gradient norms (see ``functional.gradient_pathology``).
PATHOLOGY_FIELDS: tuple[str, ...] = ("early_late_ratio", "log_slope", "vanishing_layers", "min_max_ratio")
#: 1 when a gradient-norm or loss spike happened since the previous measurement (max over ranks).
GRAD_SPIKE = "grad/spike"
#: Gradient-norm spikes since the start of training.
GRAD_SPIKE_COUNT = "grad/spike_count"
#: Loss spikes since the start of training (max over ranks: each rank watches its own loss).
LOSS_SPIKE_COUNT = "loss/spike_count"
#: Optimizer steps whose global gradient norm was not finite.
GRAD_NONFINITE = "grad/nonfinite"
#: The spike and non-finite counters, in logging order.
SPIKE_FIELDS: tuple[str, ...] = (GRAD_SPIKE, GRAD_SPIKE_COUNT, LOSS_SPIKE_COUNT, GRAD_NONFINITE)
#: Image key of the layer x step heatmap of the per-layer gradient norms.
GRAD_NORM_HEATMAP = "grad_norm/heatmap"
#: The attention temperature applied at a step.
TEMPERATURE = "temperature"

__all__ += [
    "GRADIENT_LAYER_FIELDS",
    "GRAD_NONFINITE",
    "GRAD_NORM_GLOBAL",
    "GRAD_NORM_HEADLINE",
    "GRAD_NORM_HEATMAP",
    "GRAD_SPIKE",
    "GRAD_SPIKE_COUNT",
    "LOSS_SPIKE_COUNT",
    "PATHOLOGY_FIELDS",
    "PATHOLOGY_GROUP",
    "SPIKE_FIELDS",
    "TEMPERATURE",
]


# ------------------------------------------------------------------------------ summary mode (integrations)
__all__ += ["LOG_MODES", "SUMMARY_HEADLINE_KEYS", "headline_only"]

#: What ``log=`` accepts: every key, or only the headline keys.
LOG_MODES: tuple[str, ...] = ("all", "summary")
#: The keys ``log="summary"`` keeps (without prefix): the worst theta and sensitivity over layers, the
#: global gradient norm.
SUMMARY_HEADLINE_KEYS: tuple[str, ...] = ("theta_max", "sensitivity_max", "grad_norm_global")


def headline_only(
    metrics: Mapping[str, float], prefix: str = DEFAULT_PREFIX, headline: Iterable[str] | None = None
) -> dict[str, float]:
    """The entries of ``metrics`` whose key is ``{prefix}{h}`` for a headline field ``h``.

    Example:
        >>> headline_only({"stability/theta_max": 1.0, "stability/theta_max/layer_00": 0.9})
        {'stability/theta_max': 1.0}
    """
    wanted = {f"{prefix}{h}" for h in (SUMMARY_HEADLINE_KEYS if headline is None else headline)}
    return {k: v for k, v in metrics.items() if k in wanted}
