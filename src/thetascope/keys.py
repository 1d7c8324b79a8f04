"""The key schema: every writer (monitors, callbacks, integrations) and every reader (``report/``) uses it.

Keys are ``{prefix}{field}`` for run-level values and ``{prefix}{field}/layer_XX`` for per-layer values, with
layers zero-padded to two digits. Layers of separate stacks (encoder, decoder self-attention, decoder
cross-attention) keep apart as ``{prefix}{field}/{stack}/layer_XX``.
"""

from __future__ import annotations

import re

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
HEADLINE_KEYS: tuple[str, ...] = (THETA_MAX, SENSITIVITY_MAX, "grad_norm_global")
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
