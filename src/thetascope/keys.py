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
