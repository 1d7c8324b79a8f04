"""Attention adapters: how the probe finds an attention module, reads its weights and observes its kernel.

An adapter wraps one attention module. It says whether it :meth:`~AttentionAdapter.matches` a module, gives
the head counts and :class:`~thetascope.capture.records.ProjectionWeights`, and names the *route* by which its
attention kernel is observed while the module's forward runs (through a ``TorchFunctionMode`` that is active
only inside ``probe.capture()`` or while a temperature != 1 is set):

* ``"sdpa"``: ``F.scaled_dot_product_attention`` (nanoGPT, HF ``sdpa``, timm fused attention);
* ``"softmax"``: the first softmax over the last dim of a 4-D ``[B, H, Lq, Lk]`` tensor in the module (HF
  ``eager``, hand-written attention) — its input is the scaled and masked logits;
* ``"mha"``: ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``; the adapter overrides ``handle``).

The base class implements :meth:`~AttentionAdapter.handle` for the ``"sdpa"`` and ``"softmax"`` routes: it
computes the logits of the sampled query rows, hands them to the probe (``ctx.record_logits``) and runs the
kernel with the temperature applied. A custom model usually needs only ``matches``, ``__init__`` and
``projection_weights``.

Example (a custom module; the decorator registers it for every probe created afterwards):
    >>> import torch
    >>> from torch import nn
    >>> import torch.nn.functional as F
    >>> from thetascope.capture.adapters import AttentionAdapter, register_adapter
    >>> from thetascope.capture.records import ProjectionWeights
    >>> class MyAttention(nn.Module):
    ...     def __init__(self, d: int = 16, h: int = 2) -> None:
    ...         super().__init__()
    ...         self.h, self.qkv, self.out = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         b, n, d = x.shape
    ...         q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
    ...         y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ...         return self.out(y.transpose(1, 2).reshape(b, n, d))
    >>> @register_adapter
    ... class MyAttentionAdapter(AttentionAdapter):
    ...     kind, route = "my_attention", "sdpa"
    ...     @classmethod
    ...     def matches(cls, module: nn.Module) -> bool:
    ...         return isinstance(module, MyAttention)
    ...     def __init__(self, module: nn.Module, name: str) -> None:
    ...         super().__init__(module, name)
    ...         d = module.out.in_features
    ...         self.n_heads = self.n_kv_heads = module.h
    ...         self.head_dim = d // module.h
    ...     def projection_weights(self) -> ProjectionWeights:
    ...         wq, wk, wv = self.module.qkv.weight.detach().split(self.n_heads * self.head_dim, dim=0)
    ...         return ProjectionWeights(wq, wk, wv, self.module.out.weight.detach(),
    ...                                  self.n_heads, self.n_kv_heads, self.head_dim)
    >>> from thetascope.capture import AttentionProbe
    >>> model = nn.Sequential(MyAttention(), MyAttention())
    >>> probe = AttentionProbe(model, rows_per_head=4)
    >>> with probe.capture():
    ...     _ = model(torch.randn(2, 6, 16))
    >>> [r.kind for r in probe.layers], tuple(probe.layers[0].theta.upper.shape)
    (['my_attention', 'my_attention'], (2, 2, 4))
    >>> unregister_adapter(MyAttentionAdapter)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thetascope.functional._ranges import cached_arange, mask_logits_

if TYPE_CHECKING:
    from thetascope.capture.records import LayerRecord, ProjectionWeights

__all__ = [
    "SOFTMAX_FUNCS",
    "AttentionAdapter",
    "CallContext",
    "DualRouteAdapter",
    "adapter_for",
    "gather_rows",
    "register_adapter",
    "registered_adapters",
    "sdpa_sampled_logits",
    "unregister_adapter",
]

_REGISTRY: list[type[AttentionAdapter]] = []
_ROUTES = ("sdpa", "softmax", "mha", "interface")

# The softmax entry points a TorchFunctionMode can see (F.softmax is observed before it calls Tensor.softmax;
# calls made inside a handler are not observed again).
SOFTMAX_FUNCS: frozenset[Callable[..., Any]] = frozenset(
    {F.softmax, torch.softmax, Tensor.softmax, torch.special.softmax, torch._softmax}
)


class CallContext(Protocol):
    """What the probe hands an adapter while that adapter's module runs its forward.

    Attributes:
        layer: the :class:`~thetascope.capture.records.LayerRecord` of the running module.
        inv_tau: 0-dim tensor ``1/tau`` on the kernel's device (exactly 1.0 when tau == 1).
        apply_temperature: False when tau == 1 (the kernel must then run unchanged, bitwise).
        recording: True inside ``probe.capture()``: the adapter should call :meth:`record_logits`.
        done: set once the module's kernel call was seen in the running forward.
    """

    layer: LayerRecord
    recording: bool
    done: bool

    @property
    def inv_tau(self) -> Tensor:
        """``1/tau`` as a 0-dim float32 tensor on the model's device."""
        ...

    @property
    def apply_temperature(self) -> bool:
        """Whether tau != 1."""
        ...

    @property
    def inv_tau_float(self) -> float:
        """``1/tau`` as a Python float (for kernel arguments that must be numbers, e.g. a soft-cap)."""
        ...

    def inv_tau_on(self, device: torch.device) -> Tensor:
        """``inv_tau`` on ``device`` (one tensor per device, updated in place)."""
        ...

    def fail(self, err: Exception) -> None:
        """Report a failed measurement of this layer (raises under ``strict``, else warns once, disables)."""
        ...

    def select(self, batch: int, heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The sampled batch items ``[B']`` and heads ``[H']`` (respecting ``batch_size=`` and ``heads=``)."""
        ...

    def selects_all(self, batch: int, heads: int) -> tuple[bool, bool]:
        """Whether :meth:`select` returns every batch item ``0..batch-1`` and every head ``0..heads-1`` in
        order (known on the host: an adapter can then skip the identity ``index_select``)."""
        ...

    def sample_rows(self, batch: int, heads: int, q_len: int, device: torch.device) -> Tensor:
        """Sampled query positions ``[B', H', R]`` for the items/heads of :meth:`select` (sorted per row).

        Read-only. Sampled positions are laid out head-major in memory (``positions.transpose(0, 1)`` is
        contiguous), so the rows of all items of one head can be indexed without a copy; "every row" is an
        expanded range.
        """
        ...

    def record_logits(self, logits: Tensor, query_positions: Tensor, *, valid: Tensor | None = None) -> None:
        """Store the sampled rows' logits ``[B', H', R, Lk]`` (scaled, masked with -inf, times ``inv_tau``).

        The probe computes probabilities, the theta bracket, entropy and the counts of fully masked /
        non-finite rows. ``valid`` ``[B', H', R]`` (optional) marks rows to keep; others become NaN. On an
        accelerator the probe keeps ``logits`` until the rows of the other layers join them (at the end of the
        forward at the latest): pass a tensor that nothing writes to afterwards.
        """
        ...


class AttentionAdapter:
    """Base class of attention adapters (one subclass per kind of attention module).

    Subclasses set the class variables ``kind`` (a short name), ``route`` (``"sdpa"``, ``"softmax"`` or
    ``"mha"``) and optionally ``priority`` (higher wins when several adapters match), implement
    :meth:`matches` and :meth:`projection_weights`, and set ``n_heads``, ``n_kv_heads``, ``head_dim`` in
    ``__init__``. Override :meth:`attention_input` when the module's attention input (the ``U`` of Thm 5.1) is
    not its first positional tensor argument or ``hidden_states``/``x``/``query`` keyword, and
    :attr:`norm_placement` when the adapter knows it (``"pre"``, ``"post"`` or ``"none"``); otherwise the
    probe infers it from the order in which normalisation modules run inside the enclosing block.
    """

    kind: ClassVar[str] = "attention"
    route: ClassVar[str] = "sdpa"
    priority: ClassVar[int] = 0

    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this adapter handles ``module``."""
        raise NotImplementedError

    def projection_weights(self) -> ProjectionWeights:
        """The Q/K/V/O matrices in Linear layout, detached, as the module uses them now."""
        raise NotImplementedError

    @property
    def norm_placement(self) -> str | None:
        """``"pre"``/``"post"``/``"none"`` when the adapter knows it; ``None`` lets the probe infer it."""
        return None

    @property
    def has_projections(self) -> bool:
        """Whether :meth:`projection_weights` can give the matrices (False: G_l, S_l, the bound unknown)."""
        return True

    @property
    def missing_projections_reason(self) -> str | None:
        """Why the projections were not found (``None`` when they were)."""
        return None

    def attention_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        """The attention input ``U`` (``[..., L, d]``) from the module's forward arguments."""
        for key in ("hidden_states", "x", "query"):
            val = kwargs.get(key)
            if isinstance(val, Tensor):
                return val
        for val in args:
            if isinstance(val, Tensor):
                return val
        return None

    def enter_temperature(self, module: nn.Module, ctx: CallContext) -> Callable[[], None] | None:
        """Apply the temperature to one unrecorded forward of ``module`` without watching its calls, or not.

        The probe calls this before each forward that runs while tau != 1 outside ``capture()``, with the
        module that runs (this adapter's module, or a replica of it). An adapter that can put ``1/tau`` into
        what that forward reads returns the function that takes it out again (the probe calls it after the
        forward, also when the forward raises). The default, ``None``, makes the probe intercept the module's
        kernel call instead (:meth:`intercepts`, :meth:`handle`).
        """
        return None

    def intercepts(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether ``func(*args, **kwargs)`` (seen while this module runs) is its attention kernel."""
        if self.route == "sdpa":
            return func is F.scaled_dot_product_attention
        if self.route == "softmax":
            return func in SOFTMAX_FUNCS and _softmax_is_attention(args, kwargs)
        if self.route == "mha":
            return func is F.multi_head_attention_forward
        return False

    def handle(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: CallContext,
    ) -> Any:
        """Run the intercepted kernel: record sampled logits when ``ctx.recording``, apply the temperature."""
        if func is F.scaled_dot_product_attention:
            return _handle_sdpa(func, args, kwargs, ctx)
        if func in SOFTMAX_FUNCS:
            return _handle_softmax(func, args, kwargs, ctx)
        raise NotImplementedError(
            f"adapter {type(self).__name__} with route {self.route!r} must override handle"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, heads={getattr(self, 'n_heads', '?')})"


class DualRouteAdapter(AttentionAdapter):
    """An adapter whose module calls either ``F.scaled_dot_product_attention`` or a softmax over 4-D logits,
    depending on configuration (HF ``attn_implementation``, nanoGPT's ``flash`` flag): it intercepts both."""

    route: ClassVar[str] = "sdpa"

    def intercepts(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if func is F.scaled_dot_product_attention:
            return True
        return func in SOFTMAX_FUNCS and _softmax_is_attention(args, kwargs)


def register_adapter(cls: type[AttentionAdapter]) -> type[AttentionAdapter]:
    """Register an adapter class (usable as a decorator); probes created afterwards consider it.

    Adapters are tried in descending ``priority``; among equal priorities the later registration wins, so a
    user adapter registered after the built-in ones overrides them.

    Example:
        >>> from thetascope.capture.adapters import AttentionAdapter, register_adapter, unregister_adapter
        >>> @register_adapter
        ... class Never(AttentionAdapter):
        ...     kind = "never"
        ...     @classmethod
        ...     def matches(cls, module): return False
        >>> Never in registered_adapters()
        True
        >>> unregister_adapter(Never)
    """
    if not (isinstance(cls, type) and issubclass(cls, AttentionAdapter)):
        raise TypeError(f"register_adapter expects an AttentionAdapter subclass, got {cls!r}")
    if cls.route not in _ROUTES:
        raise ValueError(f"{cls.__name__}.route must be one of {_ROUTES}, got {cls.route!r}")
    if cls in _REGISTRY:
        _REGISTRY.remove(cls)
    _REGISTRY.append(cls)
    return cls


def unregister_adapter(cls: type[AttentionAdapter]) -> None:
    """Remove a registered adapter class (no error when it is not registered)."""
    if cls in _REGISTRY:
        _REGISTRY.remove(cls)


def registered_adapters() -> list[type[AttentionAdapter]]:
    """Registered adapter classes in the order they are tried (highest priority, latest registration
    first)."""
    order = {c: i for i, c in enumerate(_REGISTRY)}
    return sorted(_REGISTRY, key=lambda c: (-c.priority, -order[c]))


def adapter_for(module: nn.Module) -> type[AttentionAdapter] | None:
    """The first registered adapter class (by priority) that matches ``module``, or None."""
    for cls in registered_adapters():
        try:
            if cls.matches(module):
                return cls
        except Exception:  # a buggy third-party matcher must not break discovery
            continue
    return None


# ------------------------------------------------------------------------------------------------------------
# Default kernels


def _softmax_is_attention(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not isinstance(x, Tensor) or x.dim() != 4:
        return False
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return isinstance(dim, int) and dim in (-1, 3)


def take(x: Tensor, dim: int, index: Tensor, everything: bool = False) -> Tensor:
    """``x.index_select(dim, index)``, or ``x`` itself when ``index`` selects every entry in order
    (``everything``, e.g. from :meth:`CallContext.selects_all`: one copy less); a size-1 (broadcast) ``dim``
    is repeated as often as ``index`` is long."""
    if x.shape[dim] == 1:  # broadcast: every index reads entry 0
        return x if index.numel() == 1 else x.index_select(dim, torch.zeros_like(index))
    return x if everything and x.shape[dim] == index.numel() else x.index_select(dim, index)


def gather_rows(
    x: Tensor, bi: Tensor, hi: Tensor, pos: Tensor, everything: tuple[bool, bool] = (False, False)
) -> Tensor:
    """``x[bi][:, hi]`` then rows ``pos`` ``[B', H', R]`` along dim 2 -> ``[B', H', R, x.shape[-1]]``.

    ``x`` may be broadcast along dims 0/1 (size 1); dim 2 must be the full query length. ``everything``: the
    flags of :meth:`CallContext.selects_all` for ``bi`` and ``hi``.
    """
    x = take(take(x, 0, bi, everything[0]), 1, hi, everything[1])
    idx = pos.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, idx)


def scaled_product(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``scale * q @ k^T`` for ``q [..., R, E]`` and ``k [..., S, E]`` (same leading dims), as one batched
    matmul whose ``alpha`` does the scaling (no copies when both are contiguous).

    Example:
        >>> q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
        >>> torch.allclose(scaled_product(q, k, 0.5), 0.5 * q @ k.transpose(-1, -2))
        True
    """
    lead = q.shape[:-2]
    q3 = q.reshape(-1, q.shape[-2], q.shape[-1])
    k3 = k.reshape(-1, k.shape[-2], k.shape[-1])
    out = q3.new_empty(q3.shape[0], q3.shape[1], k3.shape[1])
    # beta=0: the (uninitialised) input is ignored, NaN and inf in it included
    return torch.baddbmm(out, q3, k3.transpose(1, 2), beta=0.0, alpha=scale).view(*lead, *out.shape[1:])


def sdpa_sampled_logits(
    q: Tensor,
    k: Tensor,
    ctx: CallContext,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits of the sampled query rows exactly as ``F.scaled_dot_product_attention`` would form them.

    Handles ``scale=None`` (``1/sqrt(E)``), boolean (True = attend) and additive masks broadcastable to ``[B,
    H, Lq, Lk]``, ``is_causal`` with torch's top-left alignment (query ``i`` sees keys ``j <= i`` even when
    ``Lq != Lk``) and grouped-query attention (query head ``h`` reads key head ``h // (H // H_kv)``, as
    ``enable_gqa`` and HF ``repeat_kv`` do). Computed in float32; when a temperature is applied, the product
    is multiplied by ``1/tau`` and the mask is not, as in the kernel, which is handed ``q / tau``. Mask
    entries ``-inf`` stay ``-inf``.

    Args:
        q: ``[B, H, Lq, E]`` (3-D inputs are treated as ``B = 1``).
        k: ``[B, H_kv, Lk, E]``.
        ctx: the call context (gives the sampled items, heads and rows).
        attn_mask: optional mask.
        is_causal: causal masking.
        scale: logit scale.

    Returns:
        ``(logits [B', H', R, Lk] float32, query_positions [B', H', R])``.
    """
    if q.dim() == 3:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
    bsz, n_heads, q_len, e = q.shape
    k_len = k.shape[-2]
    rep = max(n_heads // k.shape[1], 1)
    bi, hi = ctx.select(bsz, n_heads, q.device)
    everything = ctx.selects_all(bsz, n_heads)
    pos = ctx.sample_rows(bsz, n_heads, q_len, q.device)
    qr = gather_rows(q.detach(), bi, hi, pos, everything).float()  # [B', H', R, E]
    kk = take(k.detach(), 0, bi, everything[0])
    kk = take(kk, 1, hi if rep == 1 else hi // rep, everything[1] and rep == 1)
    kk = kk.to(torch.float32, memory_format=torch.contiguous_format)  # the cast and the layout bmm needs
    s = (1.0 / math.sqrt(e)) if scale is None else float(scale)
    if ctx.apply_temperature:
        s *= ctx.inv_tau_float  # the kernel's q * (1/tau), folded into the one scaling of the product
    logits = scaled_product(qr, kk, s)
    if attn_mask is not None:
        m = attn_mask.detach()
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.expand(m.shape[0], m.shape[1], q_len, k_len) if m.shape[2] == 1 else m
        mr = gather_rows(m, bi, hi, pos)
        if mr.dtype == torch.bool:
            logits.masked_fill_(~mr, float("-inf"))
        else:
            logits.add_(mr)
    if is_causal:
        mask_logits_(logits, cached_arange(k_len, q.device) > pos.unsqueeze(-1))
    return logits, pos


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _bind_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(_SDPA_NAMES, args))
    bound.update(kwargs)
    return bound


def _handle_sdpa(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ctx: CallContext
) -> Any:
    b = _bind_sdpa(args, kwargs)
    q = b["query"]
    if ctx.recording:
        logits, pos = sdpa_sampled_logits(
            q,
            b["key"],
            ctx,
            attn_mask=b.get("attn_mask"),
            is_causal=bool(b.get("is_causal", False)),
            scale=b.get("scale"),
        )
        ctx.record_logits(logits, pos)
    if ctx.apply_temperature:
        b["query"] = q * ctx.inv_tau_on(q.device)
    q2, k2, v2 = b.pop("query"), b.pop("key"), b.pop("value")
    return func(q2, k2, v2, **b)


def _handle_softmax(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ctx: CallContext
) -> Any:
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    assert isinstance(x, Tensor)
    if ctx.recording:
        bsz, n_heads, q_len, _ = x.shape
        bi, hi = ctx.select(bsz, n_heads, x.device)
        pos = ctx.sample_rows(bsz, n_heads, q_len, x.device)
        rows = gather_rows(x.detach(), bi, hi, pos).float()
        if x.dtype.is_floating_point:
            # HF eager masks with finfo(dtype).min instead of -inf: treat such entries as masked.
            rows = rows.masked_fill(rows <= torch.finfo(x.dtype).min / 2, float("-inf"))
        if ctx.apply_temperature:
            rows = rows * ctx.inv_tau_on(rows.device).float()
        ctx.record_logits(rows, pos)
    if ctx.apply_temperature:
        scaled = x * ctx.inv_tau_on(x.device)
        if args:
            args = (scaled, *args[1:])
        else:
            kwargs = {**kwargs, ("input" if "input" in kwargs else "self"): scaled}
    return func(*args, **kwargs)
