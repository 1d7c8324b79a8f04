"""Plain data returned by the attention probe: projection weights and per-layer records.

Weights use the ``nn.Linear`` layout ``[out_features, in_features]`` (``y = x @ W.T``); adapters transpose
other layouts (GPT-2 ``Conv1D``) before building a :class:`ProjectionWeights`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from thetascope.capture.adapters import AttentionAdapter
    from thetascope.functional.theta import ThetaBounds

__all__ = ["LayerRecord", "ProjectionWeights", "classify_rows", "row_max_logit"]


def classify_rows(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(row_max, masked, nonfinite)`` of each row ``[..., Lk] -> [...]``, from one ``amax``.

    ``amax`` propagates NaN, is ``+inf`` when a row holds ``+inf`` and is ``-inf`` only when every entry is
    ``-inf``: ``masked`` marks fully masked rows, ``nonfinite`` rows with a NaN or ``+inf`` entry.

    Example:
        >>> classify_rows(torch.tensor([[1.0, float("-inf")], [float("-inf")] * 2, [float("nan"), 1.0]]))
        (tensor([1., -inf, nan]), tensor([False,  True, False]), tensor([False, False,  True]))
    """
    out = logits.amax(dim=-1)
    # NaN and +inf are exactly the values not below +inf (one comparison, where isnan | isposinf takes three)
    return out, torch.isneginf(out), torch.lt(out, math.inf).logical_not_()


def row_max_logit(logits: Tensor) -> Tensor:
    """The largest finite logit of each row ``[..., Lk] -> [...]`` (NaN where no entry is finite).

    ``-inf`` (masked) entries never win; a row with a ``+inf`` or NaN entry gives NaN.

    Example:
        >>> row_max_logit(torch.tensor([[1.0, float("-inf"), 3.0], [float("-inf")] * 3]))
        tensor([3., nan])
    """
    out, masked, nonfinite = classify_rows(logits)
    return torch.where(masked | nonfinite, torch.full_like(out, float("nan")), out)


@dataclass
class ProjectionWeights:
    """The Q/K/V/O projection matrices of one attention layer, as the layer uses them now.

    Tensors are detached views of the live parameters (no copy where the layout allows it), in Linear layout
    ``[out, in]``: ``w_q`` is ``[n_heads * head_dim, d_in]``, ``w_k`` and ``w_v`` are
    ``[n_kv_heads * head_dim, d_in]``, ``w_o`` is ``[d_out, n_heads * head_dim]``.

    Example:
        >>> import torch
        >>> w = torch.randn(8, 8)
        >>> wv, wo = torch.randn(8, 8), torch.randn(8, 8)
        >>> pw = ProjectionWeights(w, w, wv, wo, n_heads=2, n_kv_heads=2, head_dim=4)
        >>> pw.shared_qk, pw.per_head()["q"].shape, pw.per_head()["o"].shape
        (True, torch.Size([2, 4, 8]), torch.Size([2, 8, 4]))
    """

    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    w_o: Tensor
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def shared_qk(self) -> bool:
        """True when W_Q and W_K are the same tensor (or views of the same storage with equal layout)."""
        if self.w_q is self.w_k:
            return True
        return (
            self.w_q.shape == self.w_k.shape
            and self.w_q.stride() == self.w_k.stride()
            and self.w_q.device == self.w_k.device
            and self.w_q.data_ptr() == self.w_k.data_ptr()
        )

    def per_head(self) -> dict[str, Tensor]:
        """Split the matrices into per-head blocks (views, no copy).

        Returns:
            ``{"q": [H, d_h, d_in], "k": [H_kv, d_h, d_in], "v": [H_kv, d_h, d_in], "o": [H, d_out, d_h]}``;
            ``o[h]`` is the column block of ``W_O`` that reads head ``h`` (``W_O[:, h*d_h:(h+1)*d_h]``).
        """
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.w_q.reshape(h, dh, self.w_q.shape[-1])
        k = self.w_k.reshape(hkv, dh, self.w_k.shape[-1])
        v = self.w_v.reshape(hkv, dh, self.w_v.shape[-1])
        o = self.w_o.reshape(self.w_o.shape[0], h, dh).permute(1, 0, 2)
        return {"q": q, "k": k, "v": v, "o": o}


@dataclass(eq=False)
class LayerRecord:
    """What the probe knows and last measured about one attention layer (one per found module, depth order).

    Measured fields are ``None`` until the first ``capture()`` that ran this layer; each capture overwrites
    them. ``theta``/``entropy`` are ``[B', H', R]`` over the sampled batch items ``batch_index``, heads
    ``head_index`` and query rows ``query_positions`` (``[B', H', R]``); rows that were fully masked or
    non-finite hold NaN and are counted in ``n_masked_rows`` / ``n_nonfinite_rows``. ``max_logit`` is
    ``[B', H', R]``: the largest pre-softmax logit of each sampled row, as the model used it (after scaling,
    biases and soft-capping). ``disabled`` is set when a measurement of this layer failed (reported once); the
    layer is then no longer measured.

    ``stack`` names the stack a layer belongs to in models with several (``"encoder"``, ``"decoder"``,
    ``"decoder_cross"``), ``None`` in single-stack models; ``index`` is the depth order within its stack.
    ``attention`` is ``"self"`` or ``"cross"``. A module that calls its attention kernel several times in one
    forward (or runs several times) has the rows of every call of the capture joined along the row axis
    (``n_kernel_calls`` counts them).
    """

    name: str
    index: int
    kind: str
    adapter: AttentionAdapter = field(repr=False)
    block_name: str | None = None
    stack: str | None = None
    attention: str = "self"
    theta: ThetaBounds | None = None
    query_positions: Tensor | None = None
    batch_index: Tensor | None = None
    head_index: Tensor | None = None
    entropy: Tensor | None = None
    max_logit: Tensor | None = None
    attn_input_max_norm: Tensor | None = None
    residual_max_norm: Tensor | None = None
    n_masked_rows: Tensor | None = None
    n_nonfinite_rows: Tensor | None = None
    norm_placement: str | None = None
    n_captures: int = 0
    n_kernel_calls: int = 0
    disabled: bool = False
    _weights_fn: Callable[[], ProjectionWeights] | None = field(default=None, repr=False)

    def weights(self) -> ProjectionWeights:
        """The layer's projection weights as it uses them now (detached views of the live parameters)."""
        if self._weights_fn is not None:
            return self._weights_fn()
        return self.adapter.projection_weights()

    @property
    def has_weights(self) -> bool:
        """Whether :meth:`weights` can give the projections (False: G_l, S_l and the bound are not known)."""
        return self._weights_fn is not None or bool(getattr(self.adapter, "has_projections", True))

    @property
    def path_length_m(self) -> int:
        """Multiplicative maps on the sensitive path (Thm 6.2): 3 when W_Q and W_K are shared, else 4."""
        return 3 if self.has_weights and self.weights().shared_qk else 4

    @property
    def n_heads(self) -> int:
        """Number of query heads."""
        return int(self.adapter.n_heads)
