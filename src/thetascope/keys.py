"""The key schema: every writer (monitors, callbacks, integrations) and every reader (``report/``) uses it.

Keys are ``{prefix}{field}`` for run-level values and ``{prefix}{field}/layer_XX`` for per-layer values, with
layers zero-padded to two digits. Layers of separate stacks (encoder, decoder self-attention, decoder
cross-attention) keep apart as ``{prefix}{field}/{stack}/layer_XX``.
"""

from __future__ import annotations

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


# ------------------------------------------------------------------------------------- signal propagation
#: Per-layer fields of :class:`~thetascope.monitors.signal.SignalPropagationCore`: ``apjn/layer_XX`` is the
#: APJN from the input of block 0 to the output of block XX, ``apjn_stderr/layer_XX`` its standard error.
SIGNAL_LAYER_FIELDS: tuple[str, ...] = ("apjn", "apjn_stderr")
#: Per-module fields of tanh-like normalisers (DyT, Derf): ``{field}/{name in block}/layer_XX``, or
#: ``{field}/{module name}`` outside the blocks.
SIGNAL_NORM_FIELDS: tuple[str, ...] = ("norm_alpha", "norm_saturation")
#: Run-level fields, each logged as ``signal/{field}``: the depth fits of the APJN profile and the verdict
#: (-1 subcritical, 0 critical, 1 supercritical), plus the overall saturation fraction.
SIGNAL_FIELDS: tuple[str, ...] = (
    "power_exponent",
    "power_r2",
    "stretched_beta",
    "stretched_rate",
    "stretched_r2",
    "rmse_ratio",
    "verdict",
    "apjn_last",
    "norm_saturation",
)
#: The architecture-card line of the signal verdict (numeric code as above; logged without the prefix).
SIGNAL_CARD_KEY = "card/signal_verdict"

__all__ += ["SIGNAL_CARD_KEY", "SIGNAL_FIELDS", "SIGNAL_LAYER_FIELDS", "SIGNAL_NORM_FIELDS"]
