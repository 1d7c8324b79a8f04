"""A conservative adapter for hand-written (nanoGPT-style) attention modules.

It matches a module only when all of these hold:

* a head count in an int attribute ``n_head``, ``n_heads`` or ``num_heads``;
* either a fused ``c_attn`` ``nn.Linear(d, 3*d)`` plus ``c_proj`` ``nn.Linear`` (nanoGPT), or four
  ``nn.Linear`` named ``q_proj/k_proj/v_proj/o_proj`` (also ``q/k/v/o``, ``query/key/value/out``), with
  matching shapes;
* the source of its ``forward`` mentions ``scaled_dot_product_attention`` or ``softmax``.

Anything else is left to a user adapter (see :func:`thetascope.capture.adapters.register_adapter`).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import Tensor, nn

from thetascope.capture.adapters import DualRouteAdapter, register_adapter
from thetascope.capture.records import ProjectionWeights

__all__ = ["NanoGPTAttentionAdapter"]

_HEAD_ATTRS = ("n_head", "n_heads", "num_heads")
_QKVO_NAMES = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q", "k", "v", "o"),
    ("query", "key", "value", "out"),
)


def _head_count(module: nn.Module) -> int | None:
    for attr in _HEAD_ATTRS:
        val = getattr(module, attr, None)
        if isinstance(val, int) and not isinstance(val, bool) and val > 0:
            return val
    return None


def _qkvo(module: nn.Module) -> tuple[str, str, str, str] | None:
    for names in _QKVO_NAMES:
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            return names
    return None


def _forward_mentions_kernel(module: nn.Module) -> bool:
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention" in src or "softmax" in src


@register_adapter
class NanoGPTAttentionAdapter(DualRouteAdapter):
    """nanoGPT-style self-attention: fused ``c_attn`` (or separate q/k/v/o Linear) + a head count
    attribute."""

    kind: ClassVar[str] = "nanogpt"
    priority: ClassVar[int] = -10

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        h = _head_count(module)
        if h is None:
            return False
        c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
        if isinstance(c_attn, nn.Linear) and isinstance(c_proj, nn.Linear):
            d = c_attn.in_features
            ok = c_attn.out_features == 3 * d and c_proj.in_features == d and d % h == 0
        else:
            names = _qkvo(module)
            if names is None:
                return False
            q, k, v, o = (getattr(module, n) for n in names)
            hd, rem = divmod(q.out_features, h)
            ok = (
                rem == 0
                and k.out_features % hd == 0
                and v.out_features == k.out_features
                and o.in_features == q.out_features
                and q.in_features == k.in_features == v.in_features
            )
        return ok and _forward_mentions_kernel(module)

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        mod: Any = module
        h = _head_count(module)
        assert h is not None
        self.n_heads = h
        self._names = None if isinstance(getattr(module, "c_attn", None), nn.Linear) else _qkvo(module)
        if self._names is None:
            self.head_dim = int(mod.c_attn.in_features) // h
            self.n_kv_heads = h
        else:
            q, k = getattr(module, self._names[0]), getattr(module, self._names[1])
            self.head_dim = q.out_features // h
            self.n_kv_heads = k.out_features // self.head_dim

    def projection_weights(self) -> ProjectionWeights:
        m: Any = self.module
        if self._names is None:
            d = self.n_heads * self.head_dim
            w_q, w_k, w_v = m.c_attn.weight.detach().split(d, dim=0)
            w_o = m.c_proj.weight.detach()
        else:
            w_q, w_k, w_v, w_o = (getattr(m, n).weight.detach() for n in self._names)
        return ProjectionWeights(w_q, w_k, w_v, w_o, self.n_heads, self.n_kv_heads, self.head_dim)

    def attention_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        x = kwargs.get("x", kwargs.get("hidden_states"))
        if isinstance(x, Tensor):
            return x
        return args[0] if args and isinstance(args[0], Tensor) else None
