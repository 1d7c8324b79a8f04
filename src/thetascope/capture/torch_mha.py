"""Adapter for torch ``nn.MultiheadAttention`` (alone or inside ``nn.Transformer*`` layers).

Route ``"mha"``: while the module's forward runs, the probe's mode intercepts
``F.multi_head_attention_forward`` and hands its arguments to :meth:`TorchMHAAdapter.handle`, which

* when recording, recomputes the logits of the sampled query rows from the same arguments (in-projection
  weights and biases, ``bias_k``/``add_zero_attn``, ``static_k``, ``attn_mask`` bool or float 2-D/3-D,
  ``key_padding_mask`` bool or float, ``is_causal``), in float32, exactly as the kernel forms them;
* applies the temperature by calling the original function with a copy of the in-projection weight (and
  bias) whose query rows are multiplied by ``1/tau``. The kernel then sees ``q / tau`` and forms
  ``(q . k) / (tau sqrt(d_h)) + mask``: the additive mask is not divided, ``-inf`` stays ``-inf``, and
  autograd reaches the live parameters through the product. At tau == 1 (``ctx.apply_temperature`` False)
  the original arguments are passed untouched, so the call is bitwise the unhooked one.

The inference fast paths (``torch._native_multi_head_attention`` in ``nn.MultiheadAttention``,
``torch._transformer_encoder_layer_fwd`` and nested tensors in ``nn.TransformerEncoder[Layer]``, taken in
eval mode without grad) never call ``F.multi_head_attention_forward``. While the probe's hooks are installed
(inside ``capture()`` or while tau != 1) the adapter switches them off process-wide with
``torch.backends.mha.set_fastpath_enabled(False)``: the probe calls :meth:`TorchMHAAdapter.on_install` and
:meth:`~TorchMHAAdapter.on_uninstall` when it installs/removes its hooks (reference-counted), and the
previous setting is restored when the last hook is removed. A captured eval forward therefore runs torch's
reference ("slow") path: its output equals the fast path's to float tolerance, not bitwise. Outside
``capture()`` at tau == 1 nothing is changed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from thetascope.capture import AttentionProbe
    >>> layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    >>> probe = AttentionProbe(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), rows_per_head=3)
    >>> with probe.capture():
    ...     _ = probe.model(torch.randn(2, 5, 16))
    >>> rec = probe.layers[0]
    >>> [r.kind for r in probe.layers], tuple(rec.theta.upper.shape), rec.norm_placement
    (['torch_mha', 'torch_mha'], (2, 2, 3), 'post')
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thetascope.capture.adapters import AttentionAdapter, CallContext, register_adapter, take
from thetascope.capture.records import ProjectionWeights
from thetascope.functional._ranges import cached_arange, mask_logits_

__all__ = ["TorchMHAAdapter", "mha_fastpath_disabled"]

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
# The parameters the module passes positionally (query .. out_proj_bias); the rest go by keyword.
_N_POSITIONAL = 13


@contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Switch torch's MHA/Transformer inference fast path off for the block, then restore the setting.

    The fast path (eval mode, no grad) runs fused kernels that bypass ``F.multi_head_attention_forward`` and
    converts padded batches to nested tensors, so the probe cannot observe the attention there.

    Example:
        >>> import torch
        >>> with mha_fastpath_disabled():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
    """
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


# Process-wide: adapters holding the fast path off, and the setting to restore when the last lets go.
_FASTPATH_HOLDERS: set[int] = set()
_FASTPATH_SAVED: list[bool] = []


def _hold_fastpath_off(holder: object) -> None:
    if not _FASTPATH_HOLDERS:
        _FASTPATH_SAVED[:] = [torch.backends.mha.get_fastpath_enabled()]
        torch.backends.mha.set_fastpath_enabled(False)
    _FASTPATH_HOLDERS.add(id(holder))


def _release_fastpath(holder: object) -> None:
    if id(holder) not in _FASTPATH_HOLDERS:
        return
    _FASTPATH_HOLDERS.discard(id(holder))
    if not _FASTPATH_HOLDERS and _FASTPATH_SAVED:
        torch.backends.mha.set_fastpath_enabled(_FASTPATH_SAVED.pop())


_MHA_NAMES = tuple(_MHA_SIGNATURE.parameters)
_MHA_DEFAULTS = {
    n: p.default for n, p in _MHA_SIGNATURE.parameters.items() if p.default is not inspect.Parameter.empty
}


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    # Signature.bind costs tens of microseconds per call; this runs on every step while tau != 1.
    bound = dict(_MHA_DEFAULTS)
    bound.update(zip(_MHA_NAMES, args))
    bound.update(kwargs)
    return bound


def _call(func: Callable[..., Any], b: dict[str, Any]) -> Any:
    pos = [b[n] for n in _MHA_NAMES[:_N_POSITIONAL]]
    kw = {n: b[n] for n in _MHA_NAMES[_N_POSITIONAL:]}
    return func(*pos, **kw)


def _float_mask(mask: Tensor | None) -> Tensor | None:
    """Bool (True = masked) or additive mask -> additive float32 mask (``-inf`` where masked)."""
    if mask is None:
        return None
    mask = mask.detach()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.float()


@register_adapter
class TorchMHAAdapter(AttentionAdapter):
    """Adapter for ``torch.nn.MultiheadAttention`` (kind ``"torch_mha"``, route ``"mha"``).

    Handles packed (``in_proj_weight``) and separate (``q/k/v_proj_weight``, ``kdim``/``vdim`` !=
    ``embed_dim``) projections, ``batch_first`` both ways, unbatched inputs, ``bias_k``/``bias_v``,
    ``add_zero_attn``, every mask form and ``is_causal``. ``norm_placement`` comes from the enclosing
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``'s ``norm_first`` when the probe tells the
    adapter its parent (:meth:`bind_parent`); otherwise the probe infers it.

    The attention input ``U`` is the query; for cross-attention (key is not query) it is the query and key
    tokens together (the larger token norm of either side bounds the logits).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from thetascope.capture import AttentionProbe
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> probe = AttentionProbe(mha, rows_per_head=None)
        >>> x = torch.randn(1, 4, 8)
        >>> with probe.capture():
        ...     _ = mha(x, x, x)
        >>> probe.layers[0].theta.upper.shape, probe.layers[0].weights().w_q.shape
        (torch.Size([1, 2, 4]), torch.Size([8, 8]))
    """

    kind: ClassVar[str] = "torch_mha"
    route: ClassVar[str] = "mha"
    priority: ClassVar[int] = 10

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"TorchMHAAdapter expects nn.MultiheadAttention, got {type(module).__name__}")
        self.mha: nn.MultiheadAttention = module
        self.n_heads = self.n_kv_heads = int(module.num_heads)
        self.head_dim = int(module.head_dim)
        self._norm_first: bool | None = None

    def on_install(self) -> None:
        """Called by the probe when it installs its hooks: turn torch's MHA inference fast path off.

        Reference-counted across adapters and probes; the setting found by the first holder is restored when
        the last one calls :meth:`on_uninstall`. Also makes the ones of the key and value rows that the
        temperature's scale needs, here rather than on the first forward: made inside a compiled forward, they
        would change a dict that graph guards on, and cost a recompilation.
        """
        _hold_fastpath_off(self)
        m = self.mha
        for t in (m.in_proj_weight, m.in_proj_bias):
            if t is not None and t.shape[0] == 3 * m.embed_dim:
                _kv_ones(2 * m.embed_dim, t.dtype, t.device)

    def on_uninstall(self) -> None:
        """Called by the probe when it removes its hooks: give the fast path back (see :meth:`on_install`)."""
        _release_fastpath(self)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """True for ``nn.MultiheadAttention`` and its subclasses."""
        return isinstance(module, nn.MultiheadAttention)

    def bind_parent(self, parent: nn.Module | None) -> None:
        """Tell the adapter the module that owns it (read: ``norm_first`` of a torch Transformer layer)."""
        norm_first = getattr(parent, "norm_first", None) if parent is not None else None
        self._norm_first = bool(norm_first) if isinstance(norm_first, bool) else None

    @property
    def norm_placement(self) -> str | None:
        """``"pre"``/``"post"`` from the parent layer's ``norm_first`` when known, else None (inferred)."""
        if self._norm_first is None:
            return None
        return "pre" if self._norm_first else "post"

    def projection_weights(self) -> ProjectionWeights:
        """Detached views of the Q/K/V rows of the in-projection and of ``out_proj.weight``."""
        m = self.mha
        e = m.embed_dim
        if m._qkv_same_embed_dim:
            assert m.in_proj_weight is not None
            w = m.in_proj_weight.detach()
            w_q, w_k, w_v = w[:e], w[e : 2 * e], w[2 * e :]
        else:
            assert m.q_proj_weight is not None
            assert m.k_proj_weight is not None
            assert m.v_proj_weight is not None
            w_q, w_k, w_v = m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach()
        return ProjectionWeights(
            w_q, w_k, w_v, m.out_proj.weight.detach(), self.n_heads, self.n_kv_heads, self.head_dim
        )

    def attention_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        """The query (self-attention), or query and key tokens together (cross-attention)."""
        names = ("query", "key")
        vals = [kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)]
        query, key = vals
        if not isinstance(query, Tensor) or query.is_nested:
            return None
        if not isinstance(key, Tensor) or key is query or key.is_nested or key.shape[-1] != query.shape[-1]:
            return query
        if query.dim() != key.dim():
            return query
        # token axis: 0 for unbatched and sequence-first, 1 for batch_first
        tok = 1 if (query.dim() == 3 and self.mha.batch_first) else 0
        if query.dim() == 3 and query.shape[1 - tok] != key.shape[1 - tok]:
            return query
        return torch.cat([query.detach(), key.detach()], dim=tok)

    # ---------------------------------------------------------------------------------------------- kernel
    def handle(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: CallContext,
    ) -> Any:
        """Record the sampled rows' logits (when recording); run the kernel with the temperature applied."""
        b = _bind(args, kwargs)
        if ctx.apply_temperature:
            b = self._scaled_query_projection(b, ctx)
        out = _call(func, b)
        if ctx.recording:
            with torch.no_grad():
                logits, pos = self._sampled_logits(b, ctx)
            ctx.record_logits(logits, pos)
        return out

    def enter_temperature(self, module: nn.Module, ctx: CallContext) -> Callable[[], None] | None:
        """Shadow the module's query projection (weight rows, bias) by a copy times ``1/tau`` for one forward.

        ``nn.MultiheadAttention.forward`` reads its projections as attributes, and an instance attribute of
        the same name comes before the registered parameter (``nn.Module.__getattr__`` is only asked when
        the normal lookup fails). The kernel then gets exactly the arguments :meth:`handle` would give it,
        autograd reaches the live parameters through the product, and no mode has to watch the forward.
        The shadow goes on the module that runs (a replica of ``nn.DataParallel`` has a dict of its own).
        Modules with a forward of their own (a subclass overriding it) keep the interception.
        """
        m = module
        if not isinstance(m, nn.MultiheadAttention) or type(m).forward is not nn.MultiheadAttention.forward:
            return None
        names: tuple[str, ...] = ("in_proj_weight",) if m._qkv_same_embed_dim else ("q_proj_weight",)
        if m.in_proj_bias is not None:
            names += ("in_proj_bias",)
        shadow = vars(m)
        if any(n in shadow for n in names):
            return None
        weight, bias = _scaled_query_rows(
            ctx, m.embed_dim, getattr(m, names[0]), m.in_proj_bias, separate=not m._qkv_same_embed_dim
        )
        shadow[names[0]] = weight
        if bias is not None:
            shadow["in_proj_bias"] = bias

        def undo() -> None:
            for n in names:
                shadow.pop(n, None)

        return undo

    @staticmethod
    def _scaled_query_projection(b: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        """Copy of the arguments whose query projection (weight rows and bias) is multiplied by 1/tau."""
        b = dict(b)
        separate = bool(b["use_separate_proj_weight"])
        name = "q_proj_weight" if separate else "in_proj_weight"
        b[name], b["in_proj_bias"] = _scaled_query_rows(
            ctx, int(b["embed_dim_to_check"]), b[name], b["in_proj_bias"], separate=separate
        )
        return b

    def _sampled_logits(self, b: dict[str, Any], ctx: CallContext) -> tuple[Tensor, Tensor]:
        """Logits ``[B', H', R, S]`` (float32) of the sampled query rows as the kernel's softmax sees them."""
        query, key = b["query"].detach(), b["key"].detach()
        kpm: Tensor | None = b["key_padding_mask"]
        if query.dim() == 2:  # unbatched: the kernel adds a batch dim at position 1
            query, key = query.unsqueeze(1), key.unsqueeze(1)
            kpm = kpm.unsqueeze(0) if kpm is not None else None
        tgt_len, bsz, e = query.shape
        n_heads = int(b["num_heads"])
        dh = e // n_heads
        device = query.device
        bi, hi = ctx.select(bsz, n_heads, device)
        all_b, all_h = ctx.selects_all(bsz, n_heads)
        pos = ctx.sample_rows(bsz, n_heads, tgt_len, device)  # [B', H', R]
        nb, nh, r = pos.shape

        bias = b["in_proj_bias"]
        b_q = b_k = None
        if bias is not None:
            b_q, b_k, _ = bias.detach().float().chunk(3)
        if b["use_separate_proj_weight"]:
            w_q, w_k = b["q_proj_weight"].detach(), b["k_proj_weight"].detach()
        else:
            w = b["in_proj_weight"].detach()
            w_q, w_k = w[:e], w[e : 2 * e]

        # q of the sampled rows, per head, scaled as the kernel scales it: [B', H', R, d_h]. The rows are
        # picked from the query's tokens by one index_select in head-major order (on CPU several times faster
        # than a gather, and only they are cast to float32), then one (b)addbmm with each head's weight rows.
        tokens, item_step, pos_step = _token_rows(query)  # [L * B, E]
        pos_h, items = pos.transpose(0, 1), bi.view(1, nb, 1)  # [H', B', R]: contiguous for the probe's draws
        if pos_step == 1:
            flat = torch.add(pos_h, items, alpha=item_step)
        else:
            flat = torch.add(items, pos_h, alpha=pos_step)
        q_rows = tokens.index_select(0, flat.reshape(-1)).float().view(nh, nb * r, e)
        w_qh = take(w_q.float().view(n_heads, dh, e), 0, hi, all_h).transpose(1, 2)  # [H', E, d_h]
        scale = math.sqrt(1.0 / dh)
        if b_q is None:
            q = torch.bmm(q_rows, w_qh).mul_(scale)
        else:
            b_qh = take(b_q.view(n_heads, dh), 0, hi, all_h).unsqueeze(1)  # [H', 1, d_h]
            q = torch.baddbmm(b_qh, q_rows, w_qh, beta=scale, alpha=scale)
        # [H', B' R, d_h]: head-major, like the keys below

        # keys of the measured heads, head-major: [H', B', S, d_h]
        static_k: Tensor | None = b["static_k"]
        if static_k is not None:
            k = static_k.detach().float().view(bsz, n_heads, -1, dh).index_select(0, bi).index_select(1, hi)
            k = k.transpose(0, 1)
        else:
            # only the measured heads' key rows, one (b)addbmm that every head reads the same rows in (an
            # expanded view, not a copy): head-major output, so the product below needs no reordering copy
            k_in = take(key.transpose(0, 1), 0, bi, all_b).float()  # [B', S, E_k]
            s_len, e_k = k_in.shape[1], k_in.shape[2]
            k_rows = k_in.reshape(1, nb * s_len, e_k).expand(nh, -1, -1)
            w_kh = take(w_k.float().view(n_heads, dh, -1), 0, hi, all_h).transpose(1, 2)  # [H', E_k, d_h]
            if b_k is None:
                k = torch.bmm(k_rows, w_kh)
            else:
                k = torch.baddbmm(take(b_k.view(n_heads, dh), 0, hi, all_h).unsqueeze(1), k_rows, w_kh)
            k = k.view(nh, nb, s_len, dh)
        extra = 0
        if b["bias_k"] is not None:
            bk = b["bias_k"].detach().float().reshape(n_heads, dh).index_select(0, hi)
            k = torch.cat([k, bk[:, None, None, :].expand(-1, nb, 1, -1)], dim=2)
            extra += 1
        if b["add_zero_attn"]:
            k = torch.cat([k, k.new_zeros(nh, nb, 1, dh)], dim=2)
            extra += 1
        src_len = k.shape[2]

        # masks, following F.multi_head_attention_forward's own logic. Rows of a 2-D mask are taken
        # head-major like the product below: an additive one is the product's input (a baddbmm, as in the
        # kernel's need_weights path), the causal one fills the product before it is viewed b-major. Only a
        # 3-D mask is added to the strided [B', H', R, S] view.
        need_weights = bool(b["need_weights"])
        is_causal = bool(b["is_causal"])
        attn_mask = b["attn_mask"]
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (the kernel raises the same error)")
        flat_pos = pos_h.reshape(-1)
        causal = is_causal and kpm is None and not need_weights  # the kernel drops attn_mask, SDPA masks
        rows: Tensor | None = None
        per_item: Tensor | None = None
        if attn_mask is not None and not causal:
            m = _float_mask(attn_mask)
            assert m is not None
            if m.dim() == 2:
                rows = m.index_select(0, flat_pos)  # [H' B' R, S - extra]
                if extra:
                    rows = F.pad(rows, (0, extra))
            else:  # [B*H, L, S]
                m4 = m.view(bsz, n_heads, tgt_len, -1).index_select(0, bi).index_select(1, hi)
                per_item = m4.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, m4.shape[-1]))
                if extra:
                    per_item = F.pad(per_item, (0, extra))

        # the kernel scales q before the product (need_weights path); the SDPA path scales the same way.
        # [H' B', R, S] in memory, returned as the [B', H', R, S] view the probe expects.
        k_t = k.reshape(nh * nb, src_len, dh).transpose(1, 2)
        q3 = q.view(nh * nb, r, dh)
        logits = torch.bmm(q3, k_t) if rows is None else rows.view(nh * nb, r, src_len).baddbmm_(q3, k_t)
        if causal:  # top-left aligned, as SDPA's is_causal
            future = cached_arange(src_len, device) > flat_pos.unsqueeze(-1)  # [H' B' R, S]
            mask_logits_(logits, future.view(nh * nb, r, src_len))
        logits = logits.view(nh, nb, r, src_len).transpose(0, 1)
        if per_item is not None:
            logits.add_(per_item)
        kpm_f = _float_mask(kpm)
        if kpm_f is not None:
            kpm_f = kpm_f.index_select(0, bi)
            if extra:
                kpm_f = F.pad(kpm_f, (0, extra))
            logits.add_(kpm_f[:, None, None, :])
        return logits, pos


def _token_rows(x: Tensor) -> tuple[Tensor, int, int]:
    """The kernel's query ``[L, B, E]`` as token rows ``[L * B, E]`` with the row steps of one item and one
    position: ``row = item * item_step + position * pos_step``. A view when ``x`` is contiguous in either
    order (sequence-first, or batch_first transposed back by the module), else a copy."""
    length, bsz, e = x.shape
    if x.is_contiguous():
        return x.view(length * bsz, e), 1, bsz
    t = x.transpose(0, 1)
    return (t.view(bsz * length, e) if t.is_contiguous() else t.reshape(bsz * length, e)), length, 1


def _scaled_query_rows(
    ctx: CallContext, e: int, weight: Tensor, bias: Tensor | None, *, separate: bool
) -> tuple[Tensor, Tensor | None]:
    """The query projection times 1/tau: the ``[E, E]`` query weight (``separate``) or the query rows of the
    packed ``[3E, E]`` one, and the query part of the packed ``[3E]`` bias."""
    scale: Tensor | None = None  # [3E] of the packed weight, reused for the bias when it matches
    if separate:
        weight = weight * ctx.inv_tau_on(weight.device).to(weight.dtype)
    else:
        scale = _q_scale(ctx, e, weight)
        weight = weight * scale.unsqueeze(-1)
    if bias is not None:
        # the packed weight's scale serves the bias too when they agree in dtype, device and length
        if scale is None or (scale.dtype, scale.device, scale.shape) != (bias.dtype, bias.device, bias.shape):
            scale = _q_scale(ctx, e, bias)
        bias = bias * scale
    return weight, bias


# Ones of the key and value rows, by (length, dtype, device): never written, so one tensor serves every call.
_ONES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _kv_ones(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (n, dtype, device)
    ones = _ONES.get(key)
    if ones is None:
        with torch.inference_mode(False):  # usable in training after a first call under inference mode
            ones = _ONES[key] = torch.ones(n, dtype=dtype, device=device)
    return ones


def _q_scale(ctx: CallContext, e: int, like: Tensor) -> Tensor:
    """``[3E]``: ``1/tau`` on the query rows, 1 on the key and value rows (dtype/device of ``like``)."""
    inv = ctx.inv_tau_on(like.device).to(like.dtype)
    return torch.cat([inv.expand(e), _kv_ones(like.shape[0] - e, like.dtype, like.device)])
