"""The generic Hugging Face route: any transformers attention module that calls the attention interface.

transformers 5.x attention modules hand their post-RoPE query ``[B, H, Lq, d]``, key ``[B, H_kv, Lk, d]``,
value, mask, ``scaling`` and extras (``softcap``, ``position_bias``, ``sliding_window``, ``is_causal``,
``s_aux``) to one function, looked up at call time: the modeling file's own ``eager_attention_forward`` or an
entry of ``ALL_ATTENTION_FUNCTIONS`` (``sdpa``, ``flex_attention``, ``flash_attention_*``, user-registered
kernels). While a probe's hooks are installed, the probe replaces those two names in the globals of each found
module's ``forward`` by thin wrappers; a wrapper that receives a module with an active probe context records
the sampled rows from the arguments and applies the temperature, and otherwise calls the kernel untouched. No
per-family adapter is needed, head counts and GQA come from the tensors the kernel receives, and every kernel
call a module makes is seen. The globals are restored when the last probe removes its hooks.

Nothing here imports transformers at module import time: modules are recognised by their class's module path
and by what their ``forward`` refers to.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from thetascope.capture.adapters import (
    AttentionAdapter,
    CallContext,
    gather_rows,
    register_adapter,
    scaled_product,
    take,
)
from thetascope.capture.projections import ProjectionFinder
from thetascope.capture.records import ProjectionWeights
from thetascope.functional._ranges import cached_arange, mask_logits_

__all__ = ["HFAttentionAdapter", "interface_sampled_logits"]

# The kernel function signature: fn(module, query, key, value, attention_mask, **kwargs) -> (out, weights)
KernelFn = Callable[..., Any]
Handler = Callable[[KernelFn, str, tuple[Any, ...], dict[str, Any]], Any]

_ACTIVE: dict[int, Handler] = {}  # id(attention module) -> the probe context's handler
_WRAPPED: dict[KernelFn, KernelFn] = {}  # kernel -> its wrapper (one per kernel function)
_PATCHES: dict[int, tuple[dict[str, Any], dict[str, Any], int]] = {}  # id(globals) -> (globals, saved, refs)
_SIGNATURES: dict[KernelFn, inspect.Signature] = {}


def _forward_function(cls: type) -> Any:
    return inspect.unwrap(cls.forward)  # type: ignore[attr-defined]


_REACHES: dict[type, bool] = {}


def _class_reaches_interface(cls: type) -> bool:
    if cls not in _REACHES:
        _REACHES[cls] = _forward_reaches_interface(cls)
    return _REACHES[cls]


def _forward_reaches_interface(cls: type) -> bool:
    fn = _forward_function(cls)
    g = getattr(fn, "__globals__", {})
    if "ALL_ATTENTION_FUNCTIONS" not in g and "eager_attention_forward" not in g:
        return False
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return "attention_interface" in src or "eager_attention_forward(" in src


def reaches_interface(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers module whose ``forward`` calls the attention interface."""
    return type(module).__module__.startswith("transformers.") and _class_reaches_interface(type(module))


# ------------------------------------------------------------------------------------------------------------
# Patching the interface names in a modeling file's globals


class _InterfaceProxy:
    """Stands in for ``ALL_ATTENTION_FUNCTIONS`` in a patched modeling file: returns wrapped kernels."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def get_interface(self, attn_implementation: str, default: KernelFn) -> KernelFn:
        impl = "eager" if attn_implementation in (None, "eager") else attn_implementation
        return _wrap(self._inner.get_interface(attn_implementation, default), impl)

    def __getitem__(self, key: str) -> KernelFn:
        return _wrap(self._inner[key], key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self._inner.get(key, default)
        return _wrap(value, key) if callable(value) else value

    def __contains__(self, key: object) -> bool:
        return key in self._inner

    def __iter__(self) -> Any:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _wrap(fn: KernelFn, impl: str) -> KernelFn:
    if hasattr(fn, "__thetascope_kernel__"):  # already a wrapper (e.g. the patched eager default)
        return fn
    wrapped = _WRAPPED.get(fn)
    if wrapped is not None:
        return wrapped

    @functools.wraps(fn)
    def wrapper(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        handler = _ACTIVE.get(id(module))
        if handler is None:
            return fn(module, *args, **kwargs)
        return handler(fn, impl, (module, *args), kwargs)

    wrapper.__thetascope_kernel__ = fn  # type: ignore[attr-defined]
    _WRAPPED[fn] = wrapper
    return wrapper


def patch_module_globals(module: nn.Module) -> int:
    """Route the attention interface of ``module``'s modeling file through the wrappers; returns a key."""
    g: dict[str, Any] = _forward_function(type(module)).__globals__
    key = id(g)
    entry = _PATCHES.get(key)
    if entry is not None:
        _PATCHES[key] = (entry[0], entry[1], entry[2] + 1)
        return key
    saved: dict[str, Any] = {}
    eager = g.get("eager_attention_forward")
    if callable(eager):
        saved["eager_attention_forward"] = eager
        g["eager_attention_forward"] = _wrap(eager, "eager")
    interface = g.get("ALL_ATTENTION_FUNCTIONS")
    if interface is not None and not isinstance(interface, _InterfaceProxy):
        saved["ALL_ATTENTION_FUNCTIONS"] = interface
        g["ALL_ATTENTION_FUNCTIONS"] = _InterfaceProxy(interface)
    _PATCHES[key] = (g, saved, 1)
    return key


def unpatch_module_globals(key: int) -> None:
    """Undo one :func:`patch_module_globals`; the names are restored when the last user lets go."""
    entry = _PATCHES.get(key)
    if entry is None:
        return
    g, saved, refs = entry
    if refs > 1:
        _PATCHES[key] = (g, saved, refs - 1)
        return
    g.update(saved)
    del _PATCHES[key]


def activate(module: nn.Module, handler: Handler) -> None:
    """Kernel calls that receive ``module`` go to ``handler`` (while its globals are patched)."""
    _ACTIVE[id(module)] = handler


def deactivate(module: nn.Module) -> None:
    """Kernel calls that receive ``module`` run untouched again."""
    _ACTIVE.pop(id(module), None)


# ------------------------------------------------------------------------------------------------------------
# Logits of the sampled rows from the kernel's arguments


def _bind(fn: KernelFn, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword form of ``fn(module, query, key, value, attention_mask, *rest, **kwargs)``."""
    names = ("module", "query", "key", "value", "attention_mask")
    bound = dict(zip(names, args))
    if len(args) > len(names):  # extras passed positionally: their names come from the kernel's signature
        sig = _SIGNATURES.get(fn)
        if sig is None:
            sig = _SIGNATURES[fn] = inspect.signature(fn)
        bound = dict(sig.bind_partial(*args).arguments)
    bound.update(kwargs)
    return bound


def _block_mask_allowed(mask: Any, bi: Tensor, hi: Tensor, pos: Tensor, k_len: int) -> Tensor:
    """``[B', H', R, Lk]`` bool: where a flex ``BlockMask``'s ``mask_mod`` lets the sampled rows attend."""
    shape = (bi.numel(), hi.numel(), pos.shape[-1], k_len)
    b = bi.view(-1, 1, 1, 1).expand(shape)
    h = hi.view(1, -1, 1, 1).expand(shape)
    q = pos.unsqueeze(-1).expand(shape)
    kv = torch.arange(k_len, device=pos.device).view(1, 1, 1, -1).expand(shape)
    allowed = mask.mask_mod(b, h, q, kv)
    return torch.as_tensor(allowed, device=pos.device).to(torch.bool).expand(shape)


def interface_sampled_logits(impl: str, bound: Mapping[str, Any], ctx: CallContext) -> tuple[Tensor, Tensor]:
    """Logits ``[B', H', R, Lk]`` (float32) of the sampled query rows as the kernel ``impl`` forms them.

    Follows the transformers kernels: ``scaling`` (``None`` means ``d ** -0.5``), ``softcap`` (``c tanh(x /
    c)``, before any mask or bias), ``position_bias`` (T5-style additive bias), additive float masks
    (``finfo.min`` entries count as masked), boolean masks (True = attend), flex ``BlockMask`` (its
    ``mask_mod`` evaluated on the sampled rows), sdpa's implicit causal mask (``mask=None``, top-left aligned)
    and the flash kernels' bottom-right causal mask, padding mask ``[B, Lk]`` and ``sliding_window``. GQA:
    query head ``h`` reads key head ``h // (H / H_kv)``. The temperature multiplies everything but the mask
    (masks are 0 or -inf).
    """
    q, k = bound["query"], bound["key"]
    mask = bound.get("attention_mask")
    bsz, n_heads, q_len, e = q.shape
    k_len = k.shape[-2]
    rep = max(n_heads // k.shape[1], 1)
    dev = q.device
    bi, hi = ctx.select(bsz, n_heads, dev)
    everything = ctx.selects_all(bsz, n_heads)
    pos = ctx.sample_rows(bsz, n_heads, q_len, dev)
    qr = gather_rows(q.detach(), bi, hi, pos, everything).float()  # [B', H', R, E]
    kk = take(k.detach(), 0, bi, everything[0])
    kk = take(kk, 1, hi if rep == 1 else hi // rep, everything[1] and rep == 1)
    kk = kk.to(torch.float32, memory_format=torch.contiguous_format)  # the cast and the layout bmm needs
    scaling = bound.get("scaling")
    s = e**-0.5 if scaling is None else float(scaling)
    logits = scaled_product(qr, kk, s)
    softcap = bound.get("softcap")
    if softcap is not None:
        c = float(softcap)
        logits = torch.tanh(logits / c) * c
    bias = bound.get("position_bias")
    if isinstance(bias, Tensor):
        logits = logits + gather_rows(bias.detach()[..., :k_len], bi, hi, pos, everything).float()
    if ctx.apply_temperature:
        logits = logits * ctx.inv_tau_on(dev).float()
    # logits is ours from here on (fresh from the product and the ops above): masks apply in place
    keys = cached_arange(k_len, dev)
    flash = impl.startswith("flash")
    if isinstance(mask, Tensor) and not (flash and mask.dim() == 2):
        m = mask.detach()[..., :k_len]
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[2] == 1:
            m = m.expand(m.shape[0], m.shape[1], q_len, k_len)
        mr = gather_rows(m, bi, hi, pos)
        if mr.dtype == torch.bool:
            mask_logits_(logits, ~mr)
        else:
            logits.add_(mr)
            if m.dtype.is_floating_point:
                mask_logits_(logits, mr <= torch.finfo(m.dtype).min / 2)
    elif mask is not None and hasattr(mask, "mask_mod"):  # flex BlockMask
        mask_logits_(logits, ~_block_mask_allowed(mask, bi, hi, pos, k_len))
    elif impl == "sdpa" and mask is None:
        is_causal = bound.get("is_causal")
        module = bound.get("module")
        causal = q_len > 1 and (getattr(module, "is_causal", True) if is_causal is None else bool(is_causal))
        if causal:
            mask_logits_(logits, keys > pos.unsqueeze(-1))
    elif flash:
        module = bound.get("module")
        is_causal = bound.get("is_causal")
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        offset = k_len - q_len  # flash kernels align the causal mask bottom-right
        if causal and q_len > 1:
            mask_logits_(logits, keys > pos.unsqueeze(-1) + offset)
        window = bound.get("sliding_window")
        if window is not None:
            mask_logits_(logits, keys <= pos.unsqueeze(-1) + offset - int(window))
        if isinstance(mask, Tensor):  # [B, Lk] padding mask, 1 = keep
            keep = mask.detach().index_select(0, bi)[:, -k_len:].to(torch.bool)
            mask_logits_(logits, ~keep[:, None, None, :])
    return logits, pos


# ------------------------------------------------------------------------------------------------------------
# The adapter


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_attn_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "dim_per_head")


def _int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@register_adapter
class HFAttentionAdapter(AttentionAdapter):
    """Any transformers attention module whose ``forward`` calls the attention interface (kind ``"hf"``).

    Recognised by what its ``forward`` calls, not by family. Head counts are read from the module (or its
    ``config``) at discovery and replaced by what the kernel receives on the first call. Projection weights
    are found generically (:class:`~thetascope.capture.projections.ProjectionFinder`); where they are not,
    :attr:`has_projections` is False and :meth:`projection_weights` raises ``LookupError`` naming the reason.
    """

    kind: ClassVar[str] = "hf"
    route: ClassVar[str] = "interface"
    priority: ClassVar[int] = 10

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return reaches_interface(module)

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        config = getattr(module, "config", None)
        self._patch_key: int | None = None
        self.n_heads = _int_attr(module, _HEAD_ATTRS) or _int_attr(config, ("num_attention_heads",)) or 1
        head_dim = _int_attr(module, _HEAD_DIM_ATTRS)
        self.finder = ProjectionFinder(module, self.n_heads, head_dim)
        self.head_dim = head_dim or self.finder.head_dim or 1
        kv = self.finder.n_kv_heads or _int_attr(config, ("num_key_value_heads",))
        self.n_kv_heads = kv or self.n_heads

    def bind_parent(self, parent: nn.Module | None) -> None:
        """The enclosing module may hold the output projection (BERT's ``attention.output.dense``)."""
        self.finder.bind_parent(parent)

    @property
    def has_projections(self) -> bool:
        return self.finder.found

    @property
    def missing_projections_reason(self) -> str | None:
        return None if self.finder.found else self.finder.reason

    def projection_weights(self) -> ProjectionWeights:
        return self.finder.weights(self.n_heads, self.n_kv_heads, self.head_dim)

    def attention_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        x = kwargs.get("hidden_states")
        if isinstance(x, Tensor):
            return x
        return args[0] if args and isinstance(args[0], Tensor) else None

    def on_install(self) -> None:
        if self._patch_key is None:
            self._patch_key = patch_module_globals(self.module)

    def on_uninstall(self) -> None:
        if self._patch_key is not None:
            unpatch_module_globals(self._patch_key)
            self._patch_key = None

    def run_kernel(
        self, fn: KernelFn, impl: str, args: tuple[Any, ...], kwargs: dict[str, Any], ctx: CallContext
    ) -> Any:
        """One kernel call of the module: record the sampled rows (when recording), apply the temperature."""
        bound = _bind(fn, args, kwargs)
        q, k = bound["query"], bound["key"]
        if isinstance(q, Tensor) and q.dim() == 4 and isinstance(k, Tensor) and k.dim() == 4:
            self.n_heads, self.n_kv_heads, self.head_dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[-1])
            if ctx.recording and not torch.compiler.is_compiling():
                try:
                    with torch.no_grad():
                        logits, pos = interface_sampled_logits(impl, bound, ctx)
                    ctx.record_logits(logits, pos)
                except Exception as err:  # never break training over a measurement
                    ctx.fail(err)
            if ctx.apply_temperature:
                inv = ctx.inv_tau_on(q.device)
                bound["query"] = q * inv.to(q.dtype)
                bias = bound.get("position_bias")
                if isinstance(bias, Tensor):
                    bound["position_bias"] = bias * inv.to(bias.dtype)
                sinks = bound.get("s_aux")
                if isinstance(sinks, Tensor):
                    bound["s_aux"] = sinks * inv.to(sinks.dtype)
                if bound.get("softcap") is not None:
                    # c' tanh(x' / c') with x' = x / tau and c' = c / tau is (c tanh(x / c)) / tau
                    bound["softcap"] = float(bound["softcap"]) * ctx.inv_tau_float
        ctx.done = True
        head = [bound.pop(n) for n in ("module", "query", "key", "value", "attention_mask")]
        return fn(*head, **bound)
