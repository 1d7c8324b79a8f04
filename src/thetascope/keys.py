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
