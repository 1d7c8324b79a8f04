"""The key schema: every writer (monitors, callbacks, integrations) and every reader (``report/``) uses it.

Keys are ``{prefix}{field}`` for run-level values and ``{prefix}{field}/layer_XX`` for per-layer values, with
layers zero-padded to two digits. Layers of separate stacks (encoder, decoder self-attention, decoder
cross-attention) keep apart as ``{prefix}{field}/{stack}/layer_XX``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = [
    "ARCHITECTURE_CARD_FIELDS",
    "ATTENTION_LAYER_FIELDS",
    "ATTENTION_RUN_FIELDS",
    "CARD_PREFIX",
    "DEFAULT_PREFIX",
    "HEADLINE_KEYS",
    "PROJ_NORM",
    "SENSITIVITY",
    "SENSITIVITY_MAX",
    "STACKS",
    "TEMPERATURE_FIELD",
    "THETA_MAX",
    "THETA_MAX_LOWER",
    "THETA_P10",
    "layer_key",
    "parse_layer_key",
]

#: Prefix of every key unless the user passes another.
DEFAULT_PREFIX = "stability/"

# ---------------------------------------------------------------------------------------- attention (a10)
# The fields readers look up by name (report/); the tuples below list every field that is written.
THETA_MAX = "theta_max"
THETA_MAX_LOWER = "theta_max_lower"
THETA_P10 = "theta_p10"
PROJ_NORM = "proj_norm"
SENSITIVITY = "sensitivity"
SENSITIVITY_MAX = "sensitivity_max"
#: The attention temperature, logged by the attention monitor and the temperature warmup.
TEMPERATURE_FIELD = "temperature"
#: Per-layer fields of the attention monitor (``{prefix}{field}/layer_XX``), in logging order.
ATTENTION_LAYER_FIELDS: tuple[str, ...] = (
    THETA_MAX,
    THETA_MAX_LOWER,
    "theta_mean",
    "theta_frac_099",
    THETA_P10,
    "theta_width",
    "entropy",
    "attn_input_max_norm",
    "residual_max_norm",
    "nonfinite_rows",
    PROJ_NORM,
    "lipschitz_bound",
    SENSITIVITY,
    "max_logit",
)
#: Run-level fields of the attention monitor (``{prefix}{field}``): the maxima over layers and tau.
ATTENTION_RUN_FIELDS: tuple[str, ...] = (THETA_MAX, SENSITIVITY_MAX, TEMPERATURE_FIELD)
#: Fields (without prefix) that also go to ``trainer.callback_metrics`` for EarlyStopping/ModelCheckpoint.
#: The global gradient norm under its headline name, also put into ``trainer.callback_metrics``.
GRAD_NORM_HEADLINE = "grad_norm_global"
HEADLINE_KEYS: tuple[str, ...] = (THETA_MAX, SENSITIVITY_MAX, GRAD_NORM_HEADLINE)
#: The architecture card, logged once as hyperparameters ``{prefix}card/{field}``.
CARD_PREFIX = "card/"
ARCHITECTURE_CARD_FIELDS: tuple[str, ...] = (
    "depth",
    "norm_placement",
    "path_length_m",
    "recommended_scale",
    "residual_scaling",
    "sensitivity_uses",
)
#: Stack names of layers in models with several stacks (``{prefix}{field}/{stack}/layer_XX``).
STACKS: tuple[str, ...] = ("encoder", "decoder", "decoder_cross")
# ------------------------------------------------------------------------------------ end attention (a10)

_LAYER_RE = re.compile(r"^(?P<field>.+?)(?:/(?P<stack>[A-Za-z_]+))?/layer_(?P<index>\d+)$")


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


def parse_layer_key(key: str, prefix: str = "") -> tuple[str, str | None, int] | None:
    """``(field, stack, index)`` of a per-layer key written by :func:`layer_key`, else ``None``.

    ``prefix`` is removed first when ``key`` starts with it. A stack is recognised only among
    :data:`STACKS`, so fields that hold a slash (``grad_norm/layer_02``) parse as fields.

    Example:
        >>> parse_layer_key("stability/theta_max/layer_03", "stability/")
        ('theta_max', None, 3)
        >>> parse_layer_key("theta_max/decoder_cross/layer_01")
        ('theta_max', 'decoder_cross', 1)
        >>> parse_layer_key("stability/theta_max") is None
        True
    """
    if prefix and key.startswith(prefix):
        key = key[len(prefix) :]
    m = _LAYER_RE.match(key)
    if m is None:
        return None
    field, stack = m["field"], m["stack"]
    if stack is not None and stack not in STACKS:
        field, stack = f"{field}/{stack}", None
    return field, stack, int(m["index"])


# ---------------------------------------------------------------------------------- gradient, temperature
# Written by monitors.gradient.GradientFlowCore (callbacks.GradientFlowMonitor) and
# monitors.temperature.TemperatureController (callbacks.TemperatureWarmup); read by report/.

#: Per-layer fields of the gradient monitor: ``{prefix}grad_norm/layer_XX``, with the stack
#: (``{prefix}grad_norm/encoder/layer_XX``) for encoder-decoder models.
GRADIENT_LAYER_FIELDS: tuple[str, ...] = ("grad_norm",)
#: Global gradient norm of the stepped optimizer's parameters (``sqrt`` of the summed squares).
GRAD_NORM_GLOBAL = "grad_norm/global"
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
]


# ------------------------------------------------------------------------------------- signal propagation
#: Per-layer fields of :class:`~thetascope.monitors.signal.SignalPropagationCore`: ``apjn/layer_XX`` is the
#: APJN from the input of block 0 to the output of block XX, ``apjn_stderr/layer_XX`` its standard error.
SIGNAL_LAYER_FIELDS: tuple[str, ...] = ("apjn", "apjn_stderr")
#: Per-module fields of tanh-like normalisers (DyT, Derf): ``{field}/{name in block}/layer_XX``, or
#: ``{field}/{module name}`` outside the blocks.
SIGNAL_NORM_FIELDS: tuple[str, ...] = ("norm_alpha", "norm_saturation")
#: The fields of :class:`~thetascope.functional.depth_fit.DepthFit` logged as ``signal/{field}``: the
#: power-law and stretched-exponential fits of the APJN depth profile and how well each explains it.
SIGNAL_FIT_FIELDS: tuple[str, ...] = (
    "power_exponent",
    "power_r2",
    "stretched_beta",
    "stretched_rate",
    "stretched_r2",
    "rmse_ratio",
)
#: Run-level fields, each logged as ``signal/{field}``: the depth fits of the APJN profile and the verdict
#: (-1 subcritical, 0 critical, 1 supercritical), plus the overall saturation fraction.
SIGNAL_FIELDS: tuple[str, ...] = (
    *SIGNAL_FIT_FIELDS,
    "verdict",
    "apjn_last",
    "norm_saturation",
)
#: The architecture-card line of the signal verdict (numeric code as above), ``{prefix}card/signal_verdict``
#: beside the attention monitor's card fields.
SIGNAL_CARD_KEY = CARD_PREFIX + "signal_verdict"

__all__ += ["SIGNAL_CARD_KEY", "SIGNAL_FIELDS", "SIGNAL_FIT_FIELDS", "SIGNAL_LAYER_FIELDS"]
__all__ += ["SIGNAL_NORM_FIELDS"]
# ---------------------------------------------------------------------------------------------- curvature
__all__ += ["CURVATURE_FIELDS", "CURVATURE_HEADLINE", "CURVATURE_LAYER_FIELDS", "CURVATURE_SUBLAYER_TYPES"]
__all__ += ["trace_type_key"]

#: Run-level fields of the curvature monitor (``{prefix}{field}``).
CURVATURE_FIELDS: tuple[str, ...] = (
    "curvature/sharpness",  # λ_max of the loss Hessian on the held batch
    "curvature/sharpness_residual",  # ‖Hx − λx‖/|λ| of the returned eigenpair (convergence)
    "curvature/precond_sharpness",  # λ_max(P⁻¹H) with Adam's own bias-corrected second moment
    "curvature/precond_residual",
    "curvature/threshold",  # the optimizer's stability threshold (2/lr, (2+2β)/lr, (2+2β₁)/((1−β₁)lr))
    "curvature/stability_ratio",  # the compared sharpness over its threshold: 1 is the edge of stability
    "curvature/loss",  # held-batch loss at the measured parameters
    "curvature/trace",  # Hutchinson trace of the whole Hessian
    "curvature/trace_stderr",
    "curvature/taylor_first",  # gᵀΔθ of the step taken
    "curvature/taylor_second",  # gᵀΔθ + ½ΔθᵀHΔθ
    "curvature/loss_change",  # observed loss change of that step on the same batch
    "curvature/taylor_ratio",  # observed / second-order prediction
)
#: Per-block fields (``layer_key(prefix, field, i)``).
CURVATURE_LAYER_FIELDS: tuple[str, ...] = ("curvature/trace", "curvature/trace_stderr")
#: Sublayer types with a trace of their own: ``{prefix}curvature/trace_type/{type}`` (and ``_stderr``).
CURVATURE_SUBLAYER_TYPES: tuple[str, ...] = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",  # fused projections whose Q/K/V rows interleave per head (not split)
    "attn_o",
    "ffn",
    "norm",
    "embedding",
    "head",
    "other",
)
#: The curvature headline (without prefix).
CURVATURE_HEADLINE: str = "curvature/stability_ratio"


def trace_type_key(prefix: str, sublayer: str, stderr: bool = False) -> str:
    """Key of a per-sublayer-type trace.

    Example:
        >>> trace_type_key("stability/", "attn_q"), trace_type_key("", "ffn", stderr=True)
        ('stability/curvature/trace_type/attn_q', 'curvature/trace_type_stderr/ffn')
    """
    return f"{prefix}curvature/trace_type{'_stderr' if stderr else ''}/{sublayer}"


# ------------------------------------------------------------------------------ summary mode (integrations)
__all__ += ["LOG_MODES", "headline_only"]

#: What ``log=`` accepts: every key, or only the headline keys.
LOG_MODES: tuple[str, ...] = ("all", "summary")


def headline_only(
    metrics: Mapping[str, float], prefix: str = DEFAULT_PREFIX, headline: Iterable[str] | None = None
) -> dict[str, float]:
    """The entries of ``metrics`` whose key is ``{prefix}{h}`` for a headline field ``h``.

    Example:
        >>> headline_only({"stability/theta_max": 1.0, "stability/theta_max/layer_00": 0.9})
        {'stability/theta_max': 1.0}
    """
    wanted = {f"{prefix}{h}" for h in (HEADLINE_KEYS if headline is None else headline)}
    return {k: v for k, v in metrics.items() if k in wanted}
