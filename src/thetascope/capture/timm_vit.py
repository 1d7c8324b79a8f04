"""Adapter for timm's ViT self-attention (``timm.layers.attention.Attention``, used by ``VisionTransformer``).

timm is optional and never imported here: the adapter matches by class name and module path (any class in
the module's MRO named ``Attention`` defined in ``timm.layers.attention`` or, for older timm releases,
``timm.models.vision_transformer``) and checks the fused ``qkv`` Linear ``[3 * H * d_h, dim]`` and ``proj``.

The module calls ``F.scaled_dot_product_attention`` when ``fused_attn`` is True and a softmax over
``q * scale @ k^T (+ mask)`` otherwise; the adapter intercepts whichever runs (``DualRouteAdapter``), so
``fused_attn`` may change after the probe is built. ``q_norm``/``k_norm`` act before the kernel, so the
observed logits are the normalised ones. The temperature follows the base routes: the sdpa route multiplies
the query fed to the kernel by ``1/tau``; the softmax route multiplies the (scaled, masked) logits by
``1/tau`` (the same thing when no additive float mask is given, which is how ViTs run). Projection weights
are views of the ``qkv`` rows and of ``proj.weight``; with ``qk_norm`` the effective query/key maps also
include the norms, which these matrices do not.

Example:
    >>> import torch
    >>> import timm  # optional dependency: this example needs it installed
    >>> from thetascope.capture import AttentionProbe
    >>> vit = timm.models.vision_transformer.VisionTransformer(
    ...     img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    >>> probe = AttentionProbe(vit, rows_per_head=None)
    >>> with probe.capture():
    ...     _ = vit(torch.randn(1, 3, 16, 16))
    >>> [r.name for r in probe.layers], probe.layers[0].norm_placement
    (['blocks.0.attn', 'blocks.1.attn'], 'pre')
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from thetascope.capture.adapters import DualRouteAdapter, register_adapter
from thetascope.capture.records import ProjectionWeights

__all__ = ["TimmViTAttentionAdapter"]

_TIMM_ATTENTION_HOMES = ("timm.layers.attention", "timm.models.vision_transformer")


def _is_timm_attention_class(module: nn.Module) -> bool:
    return any(
        c.__name__ == "Attention" and c.__module__ in _TIMM_ATTENTION_HOMES for c in type(module).__mro__
    )


@register_adapter
class TimmViTAttentionAdapter(DualRouteAdapter):
    """timm ViT ``Attention`` (kind ``"timm_vit"``): fused ``qkv`` Linear, ``proj``, optional q/k norms.

    Example:
        >>> from torch import nn
        >>> TimmViTAttentionAdapter.matches(nn.Linear(2, 2))
        False
    """

    kind: ClassVar[str] = "timm_vit"
    priority: ClassVar[int] = 10

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """True for timm's ``Attention`` (or a subclass) with a ``qkv`` Linear of ``3 * H * d_h`` outputs."""
        if not _is_timm_attention_class(module):
            return False
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        h = getattr(module, "num_heads", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(h, int) and h > 0):
            return False
        attn_dim = getattr(module, "attn_dim", proj.in_features)
        return bool(qkv.out_features == 3 * attn_dim and attn_dim % h == 0)

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        self.n_heads = self.n_kv_heads = int(module.num_heads)  # type: ignore[arg-type]
        proj = module.proj
        assert isinstance(proj, nn.Linear)
        self.attn_dim = int(getattr(module, "attn_dim", proj.in_features))
        self.head_dim = int(getattr(module, "head_dim", self.attn_dim // self.n_heads))

    def projection_weights(self) -> ProjectionWeights:
        """Detached views: rows ``[0, D)``, ``[D, 2D)``, ``[2D, 3D)`` of ``qkv.weight``; ``proj.weight``."""
        qkv, proj = self.module.qkv, self.module.proj
        assert isinstance(qkv, nn.Linear)
        assert isinstance(proj, nn.Linear)
        w_q, w_k, w_v = qkv.weight.detach().split(self.attn_dim, dim=0)
        return ProjectionWeights(
            w_q, w_k, w_v, proj.weight.detach(), self.n_heads, self.n_kv_heads, self.head_dim
        )
