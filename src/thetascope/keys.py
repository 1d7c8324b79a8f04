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
