"""Adapters for HF transformers attention modules (GPT-2, Llama-family, BERT-family).

transformers 5.x picks the kernel from ``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``:
``eager_attention_forward`` ends in ``nn.functional.softmax`` over ``[B, H, Lq, Lk]`` logits that already
carry
the scale and the additive mask, and ``sdpa_attention_forward`` calls ``F.scaled_dot_product_attention`` (with
``is_causal``, a boolean/additive mask, ``enable_gqa`` or ``repeat_kv``). The adapters intercept both. Queries
and keys are observed after RoPE. Flash-attention / flex-attention kernels are not observable (the probe
warns).

Nothing here imports transformers: modules are recognised by their class's module path and attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from thetascope.capture.adapters import CallContext, DualRouteAdapter, register_adapter, sdpa_sampled_logits
from thetascope.capture.records import ProjectionWeights

__all__ = ["HFBertAttentionAdapter", "HFGPT2AttentionAdapter", "HFLlamaAttentionAdapter"]


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    x = kwargs.get("hidden_states")
    if isinstance(x, Tensor):
        return x
    return args[0] if args and isinstance(args[0], Tensor) else None


def _weight(linear: Any) -> Tensor:
    return linear.weight.detach()


@register_adapter
class HFGPT2AttentionAdapter(DualRouteAdapter):
    """HF GPT-2 ``GPT2Attention`` (self-attention only): fused ``Conv1D`` ``c_attn`` stored ``[in,
    3*out]``."""

    kind: ClassVar[str] = "hf_gpt2"
    priority: ClassVar[int] = 10

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (
            _from_transformers(module)
            and type(module).__name__.endswith("Attention")
            and hasattr(module, "c_attn")
            and hasattr(module, "c_proj")
            and type(module.c_attn).__name__ == "Conv1D"
            and not getattr(module, "is_cross_attention", False)
            and isinstance(getattr(module, "num_heads", None), int)
        )

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        m: Any = module
        self.n_heads = self.n_kv_heads = int(m.num_heads)
        self.head_dim = int(m.head_dim)

    @property
    def norm_placement(self) -> str | None:
        return "pre"

    def projection_weights(self) -> ProjectionWeights:
        m: Any = self.module
        w = _weight(m.c_attn).t()  # Conv1D [in, 3d] -> Linear [3d, in]
        d = self.n_heads * self.head_dim
        w_q, w_k, w_v = w.split(d, dim=0)
        w_o = _weight(m.c_proj).t()
        return ProjectionWeights(w_q, w_k, w_v, w_o, self.n_heads, self.n_kv_heads, self.head_dim)

    def attention_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        return _hidden_states(args, kwargs)


@register_adapter
class HFLlamaAttentionAdapter(DualRouteAdapter):
    """Llama-family attention (Llama, Mistral, Qwen2, ...): ``q_proj``/``k_proj``/``v_proj``/``o_proj``
    Linear,
    grouped-query heads (``num_key_value_heads``), RoPE applied before the kernel (observed post-RoPE)."""

    kind: ClassVar[str] = "hf_llama"
    priority: ClassVar[int] = 10

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if not (_from_transformers(module) and type(module).__name__.endswith("Attention")):
            return False
        if not all(
            isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ):
            return False
        config = getattr(module, "config", None)
        return (
            isinstance(getattr(module, "head_dim", None), int)
            and isinstance(getattr(config, "num_attention_heads", None), int)
            and not getattr(module, "is_cross_attention", False)
        )

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        m: Any = module
        self.head_dim = int(m.head_dim)
        self.n_heads = m.q_proj.out_features // self.head_dim
        self.n_kv_heads = m.k_proj.out_features // self.head_dim

    @property
    def norm_placement(self) -> str | None:
        return None  # Llama is pre-norm; Gemma-style sandwich norms exist too: let the probe observe it

    def projection_weights(self) -> ProjectionWeights:
        m: Any = self.module
        return ProjectionWeights(
            _weight(m.q_proj),
            _weight(m.k_proj),
            _weight(m.v_proj),
            _weight(m.o_proj),
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
        )

    def attention_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        return _hidden_states(args, kwargs)

    def handle(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: CallContext,
    ) -> Any:
        """As the base class, but undoes HF's ``pack_gqa`` (one-token decoding with GQA, query packed to
        ``[B, H_kv, H/H_kv, d]``) before measuring, so rows stay ``[B, H, 1]``."""
        if func is not F.scaled_dot_product_attention or not ctx.recording or self.n_kv_heads == self.n_heads:
            return super().handle(func, types, args, kwargs, ctx)
        b = dict(zip(("query", "key", "value", "attn_mask"), args))
        b.update(kwargs)
        q, k = b["query"], b["key"]
        n_rep = self.n_heads // self.n_kv_heads
        if not (
            q.dim() == 4
            and q.shape[1] == self.n_kv_heads
            and q.shape[2] == n_rep
            and k.shape[1] == q.shape[1]
        ):
            return super().handle(func, types, args, kwargs, ctx)
        mask = b.get("attn_mask")
        if (
            isinstance(mask, Tensor)
            and mask.dim() == 4
            and mask.shape[1] == self.n_kv_heads
            and mask.shape[2] == n_rep
        ):
            mask = mask.reshape(mask.shape[0], self.n_heads, 1, mask.shape[-1])
        logits, pos = sdpa_sampled_logits(
            q.reshape(q.shape[0], self.n_heads, 1, q.shape[-1]), k, ctx, attn_mask=mask, scale=b.get("scale")
        )
        ctx.record_logits(logits, pos)
        ctx.recording = False  # measured; the base class now only applies the temperature
        try:
            return super().handle(func, types, args, kwargs, ctx)
        finally:
            ctx.recording = True


@register_adapter
class HFBertAttentionAdapter(DualRouteAdapter):
    """BERT-family ``BertAttention`` (BERT, RoBERTa, ...): ``self.query/key/value`` + ``output.dense``,
    post-LN."""

    kind: ClassVar[str] = "hf_bert"
    priority: ClassVar[int] = 10

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if not (_from_transformers(module) and type(module).__name__.endswith("Attention")):
            return False
        inner = getattr(module, "self", None)
        out = getattr(module, "output", None)
        return (
            isinstance(inner, nn.Module)
            and all(isinstance(getattr(inner, n, None), nn.Linear) for n in ("query", "key", "value"))
            and isinstance(getattr(out, "dense", None), nn.Linear)
            and isinstance(getattr(inner, "num_attention_heads", None), int)
            and not getattr(module, "is_cross_attention", False)
        )

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        m: Any = module
        inner = m.self
        self.n_heads = self.n_kv_heads = int(inner.num_attention_heads)
        self.head_dim = int(inner.attention_head_size)

    @property
    def norm_placement(self) -> str | None:
        return "post"

    def projection_weights(self) -> ProjectionWeights:
        m: Any = self.module
        inner = m.self
        return ProjectionWeights(
            _weight(inner.query),
            _weight(inner.key),
            _weight(inner.value),
            _weight(m.output.dense),
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
        )

    def attention_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        return _hidden_states(args, kwargs)
