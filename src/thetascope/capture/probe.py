"""The attention probe: finds attention modules, observes their kernel calls, applies the temperature.

Framework-free: works with plain PyTorch, Fabric or Lightning (the Lightning callbacks wrap it).

How it observes: while ``probe.capture()`` is open (or while a temperature != 1 is set), every found attention
module carries a forward pre-hook and a forward hook. The pre-hook pushes a ``TorchFunctionMode`` that is
active only while that module's forward runs; the mode hands the module's attention kernel call (chosen by its
adapter's route) to the adapter, which records the sampled rows' logits and applies the temperature. The
post-hook pops the mode. Outside ``capture()`` and at tau == 1 no hook is installed, so the model runs exactly
as without a probe.

HF modules (route ``"interface"``) need no mode: the names of the attention interface in their modeling file
are wrapped while hooks are installed (see :mod:`thetascope.capture.hf`), and the wrapper hands each kernel
call of a module with an active context to its adapter.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from thetascope.capture import hf
from thetascope.capture.adapters import AttentionAdapter, adapter_for
from thetascope.capture.records import LayerRecord, classify_rows
from thetascope.functional._ranges import cached_arange
from thetascope.functional.theta import ThetaBounds

__all__ = ["AttentionProbe"]

_NORM_HINTS = ("layernorm", "rmsnorm", "groupnorm", "batchnorm", "norm")
# Softmax rows (rows x keys) held during a capture before their brackets are computed, all of them together:
# 64 MB of float32 (GPT-2 774M, B=4, 64 rows per head: three layers, 15,360 rows, which fit one bracket block
# of 2**23 elements on a GPU), a few dozen kernel launches for all of them.
_PENDING_ELEMENTS = 1 << 24
# Random scores drawn at once for the sampled rows of several layers (16 MB of host memory at most).
_DRAW_ELEMENTS = 1 << 22


def _defers(device: torch.device) -> bool:
    """Whether rows on ``device`` wait for the other layers' rows before their bracket is computed.

    Not on CPU: there the launches cost little and the rows are best measured while still in cache (in a
    training forward of the issue-13 model, one layer at a time took 4-16 ms less per measurement).
    """
    return device.type != "cpu"


class _PendingRows(NamedTuple):
    """One kernel call's sampled rows, recorded but not yet measured (see ``AttentionProbe._record``)."""

    ctx: _LayerContext
    logits: Tensor  # [..., S] float32 logits of the sampled rows, contiguous where possible (see swapped)
    valid: Tensor | None  # [...] rows to keep (others count as masked), or None: all
    pos: Tensor
    swapped: bool  # logits (and valid) hold the call's rows with dims 0 and 1 swapped (head-major)


class _RowValues(NamedTuple):
    """The per-row values of one kernel call's rows (NaN on masked and non-finite rows) and their counts."""

    lower: Tensor
    upper: Tensor
    entropy: Tensor
    max_logit: Tensor
    n_masked: Tensor
    n_nonfinite: Tensor


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._BatchNorm):
        return True
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(module, rms):
        return True
    name = type(module).__name__.lower()
    return name.endswith(_NORM_HINTS) and not any(True for _ in module.children())


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    if "dropout" in name or _is_norm(module):
        return False
    return ("attention" in name or name.endswith("attn")) and any(True for _ in module.parameters())


def _cat_rows(old: Tensor, new: Tensor, fill: float = float("nan")) -> Tensor:
    """Join ``[B', H', R]`` row tensors of two kernel calls along the rows, padding dims 0-1 with ``fill``."""
    b, h = max(old.shape[0], new.shape[0]), max(old.shape[1], new.shape[1])

    def pad(x: Tensor) -> Tensor:
        if x.shape[:2] == (b, h):
            return x
        out = torch.full((b, h, x.shape[2]), fill, dtype=x.dtype, device=x.device)
        out[: x.shape[0], : x.shape[1]] = x
        return out

    return torch.cat([pad(old), pad(new.to(old.device))], dim=2)


_CROSS_NAMES = ("encoder_attn", "encdecattention", "crossattention", "cross_attn", "cross_attention", "xattn")


def _is_cross(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if getattr(module, "is_cross_attention", False) is True:
        return True
    last = name.rpartition(".")[2].lower()
    if any(c in last for c in _CROSS_NAMES):
        return True
    return last == "multihead_attn" and isinstance(parent, nn.TransformerDecoderLayer)


def _stack_root(name: str) -> tuple[str, str] | None:
    """``(path up to the first encoder/decoder component, "encoder" | "decoder")`` or None."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        low = p.lower()
        for label in ("encoder", "decoder"):
            if low == label or low.endswith("_" + label):
                return ".".join(parts[: i + 1]), label
    return None


class _KernelMode(TorchFunctionMode):
    """Active only inside one attention module's forward; routes its kernel call to the adapter."""

    def __init__(self, ctx: _LayerContext) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        ctx = self.ctx
        if not ctx.done and ctx.adapter.intercepts(func, args, kwargs):
            ctx.done = True
            if not ctx.recording:
                return ctx.adapter.handle(func, types, args, kwargs, ctx)
            try:
                return ctx.adapter.handle(func, types, args, kwargs, ctx)
            except Exception as err:
                # Never break training over a measurement: stop measuring this layer and run the kernel (with
                # the temperature, which is part of training, not of the measurement).
                ctx.probe._fail_layer(ctx, err)
                return ctx.adapter.handle(func, types, args, kwargs, ctx)
        return func(*args, **kwargs)


class _LayerContext:
    """The CallContext the probe gives an adapter (see :class:`thetascope.capture.adapters.CallContext`)."""

    def __init__(self, probe: AttentionProbe, layer: LayerRecord, adapter: AttentionAdapter) -> None:
        self.probe = probe
        self.layer = layer
        self.adapter = adapter
        self.done = False
        self.recording = False
        self.recorded_in = -1  # the capture number of this layer's last recorded kernel call
        self.exits: list[Callable[[], None]] = []  # what undoes each running forward's mode or shadow

    def fail(self, err: Exception) -> None:
        self.probe._fail_layer(self, err)

    @property
    def inv_tau_float(self) -> float:
        return 1.0 / self.probe._tau

    def run_interface(
        self, fn: Callable[..., Any], impl: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The handler of the generic HF route for this layer's module."""
        adapter = self.adapter
        assert isinstance(adapter, hf.HFAttentionAdapter)
        return adapter.run_kernel(fn, impl, args, kwargs, self)

    @property
    def apply_temperature(self) -> bool:
        return self.probe._temp_on  # a bool, so torch.compile guards on it and not on the value of tau

    @property
    def inv_tau(self) -> Tensor:
        return self.inv_tau_on(self.probe._default_device())

    def inv_tau_on(self, device: torch.device) -> Tensor:
        return self.probe._inv_tau_on(device)

    def select(self, batch: int, heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.probe._select(batch, heads, device)

    def selects_all(self, batch: int, heads: int) -> tuple[bool, bool]:
        return self.probe._selects_all(batch, heads)

    def sample_rows(self, batch: int, heads: int, q_len: int, device: torch.device) -> Tensor:
        return self.probe._sample_rows(batch, heads, q_len, device)

    def record_logits(self, logits: Tensor, query_positions: Tensor, *, valid: Tensor | None = None) -> None:
        self.probe._record(self, logits, query_positions, valid)


class AttentionProbe:
    """Finds every attention module of a model and measures its attention rows on demand.

    Discovery walks the module tree in registration order (depth order for the usual block lists), tries the
    registered adapters by priority (:func:`thetascope.capture.adapters.register_adapter`) and does not
    descend into a matched module. Built-in adapters: every HF transformers attention module that calls the
    attention interface (eager, sdpa, flex_attention, flash, registered kernels; see
    :mod:`thetascope.capture.hf`), nanoGPT-style modules calling ``F.scaled_dot_product_attention``, torch
    ``nn.MultiheadAttention`` and (when present) timm ViT. Encoder-decoder models get ``stack`` and
    ``attention`` per layer and ``index`` within each stack.

    Args:
        model: the model (an ``nn.Module``; a ``torch.compile`` wrapper is unwrapped to ``_orig_mod``).
        rows_per_head: query rows sampled per (batch item, head); ``None`` measures every row.
        heads: head indices to measure (an int ``n`` means the first ``n``); ``None`` = all heads.
        layers: which found layers to measure: indices into depth order or module names; ``None`` = all.
        batch_size: measure only the first ``batch_size`` batch items; ``None`` = all.
        seed: seed of the row sampler (a private ``torch.Generator``; the global RNG is never touched).
        exact_top: ``exact_top`` of :func:`thetascope.functional.theta.balanced_mass_factor`.
        strict: raise when measuring a layer fails; by default the failure is reported once (``UserWarning``
            naming the layer and the reason), the layer's ``disabled`` flag is set and training goes on.

    Raises:
        ValueError: when no attention module is found (the message lists what was searched and how to register
            an adapter), or for invalid arguments.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).eval()
        >>> probe = AttentionProbe(model, rows_per_head=4)
        >>> with probe.capture():
        ...     _ = model(torch.randint(0, 50, (2, 8)))
        >>> [r.name for r in probe.layers], tuple(probe.layers[0].theta.upper.shape)
        (['transformer.h.0.attn', 'transformer.h.1.attn'], (2, 4, 4))
        >>> probe.set_temperature(2.0)   # logits / 2 in every layer, on every forward, until set back to 1
        >>> probe.set_temperature(1.0)   # hooks removed: the model runs exactly as without a probe
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rows_per_head: int | None = 64,
        heads: int | Sequence[int] | None = None,
        layers: Sequence[int] | Sequence[str] | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        exact_top: int = 10,
        strict: bool = False,
    ) -> None:
        def is_int(v: Any) -> bool:  # bools are ints to Python, never to us
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if rows_per_head is not None and (not is_int(rows_per_head) or rows_per_head < 1):
            raise ValueError(f"rows_per_head must be a positive int or None, got {rows_per_head!r}")
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if not is_int(exact_top) or not 1 <= exact_top <= 20:
            raise ValueError(f"exact_top must be an int in 1..20, got {exact_top!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if is_int(heads):
            if heads < 1:  # type: ignore[operator]
                raise ValueError(
                    f"heads must be a positive int, a sequence of head indices or None, got {heads}"
                )
            heads = list(range(heads))  # type: ignore[arg-type]
        elif heads is not None:
            seq: Any = heads
            if isinstance(seq, (str, bytes)) or not all(is_int(h) for h in seq):
                raise ValueError(
                    f"heads must be a positive int, a sequence of head indices or None, got {heads!r}"
                )
            heads = [int(h) for h in heads]  # type: ignore[union-attr]
            if not heads or min(heads) < 0:
                raise ValueError(f"heads must hold non-negative head indices, got {heads!r}")
        self.model = getattr(model, "_orig_mod", model)
        self._compiled = self.model is not model
        self.rows_per_head = rows_per_head
        self.heads: list[int] | None = heads
        self.batch_size = batch_size
        self.seed = int(seed)
        self.exact_top = exact_top
        self.strict = strict
        self._tau = 1.0
        self._temp_on = False
        self._inv_tau: dict[torch.device, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._installed_for: str | None = None  # None | "temperature" | "capture"
        self._recording = False
        self._pending: list[_PendingRows] = []
        self._indices: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
        self._draws: dict[tuple[int, int, int, torch.device], list[Tensor]] = {}
        self._pending_elements = 0
        self._compiled_seen = False
        self._n_captures = 0
        self._gen = torch.Generator()
        self._warned: set[str] = set()
        self._unobserved: list[str] = []
        self._unobserved_warned: set[str] = set()
        self.layers: list[LayerRecord] = []
        self._contexts: list[_LayerContext] = []
        self._blocks: dict[str, nn.Module] = {}
        self._discover(layers)

    # ---------------------------------------------------------------------------------------------- discovery
    def _discover(self, layers: Sequence[int] | Sequence[str] | None) -> None:
        found: list[tuple[str, nn.Module, type[AttentionAdapter]]] = []
        unmatched: list[str] = []
        searched: set[str] = set()

        def walk(prefix: str, module: nn.Module) -> bool:
            searched.add(type(module).__name__)
            cls = adapter_for(module)
            if cls is not None:
                found.append((prefix, module, cls))
                return True
            any_child = False
            for child_name, child in module.named_children():
                any_child |= walk(f"{prefix}.{child_name}" if prefix else child_name, child)
            if not any_child and _looks_like_attention(module):
                unmatched.append(f"{prefix or '<root>'} ({type(module).__name__})")
            return any_child

        walk("", self.model)
        if unmatched:
            warnings.warn(
                "thetascope: no attention adapter matches "
                + ", ".join(unmatched)
                + "; these modules are not measured. Register one with "
                "thetascope.capture.register_adapter (see thetascope.capture.adapters for an example).",
                UserWarning,
                stacklevel=3,
            )
        if not found:
            raise ValueError(
                f"AttentionProbe found no attention module in {type(self.model).__name__}. Searched module "
                f"classes: {sorted(searched)}. Known kinds: HF transformers modules calling the attention "
                "interface, nanoGPT-style modules (c_attn/c_proj or q/k/v/o Linear + n_head calling "
                "F.scaled_dot_product_attention), "
                "nn.MultiheadAttention, timm ViT. For a custom module, subclass "
                "thetascope.capture.AttentionAdapter and decorate it with @register_adapter."
            )
        selected = list(range(len(found)))
        if layers is not None:
            names = [n for n, _, _ in found]
            selected = []
            for item in layers:
                if isinstance(item, str):
                    if item not in names:
                        raise ValueError(f"layers: no attention module named {item!r}; found {names}")
                    selected.append(names.index(item))
                else:
                    if not -len(found) <= int(item) < len(found):
                        raise ValueError(
                            f"layers: index {item} out of range for {len(found)} attention layers"
                        )
                    selected.append(int(item) % len(found))
            selected = sorted(set(selected))
        modules = dict(self.model.named_modules())
        for i in selected:
            name, module, cls = found[i]
            adapter = cls(module, name)
            bind_parent = getattr(adapter, "bind_parent", None)  # optional hook (torch_mha: reads norm_first)
            if bind_parent is not None:
                bind_parent(modules.get(name.rpartition(".")[0]) if name else None)
            block_name = self._block_of(name, modules)
            parent = modules.get(name.rpartition(".")[0]) if name else None
            rec = LayerRecord(
                name=name,
                index=i,
                kind=cls.kind,
                adapter=adapter,
                block_name=block_name,
                attention="cross" if _is_cross(name, module, parent) else "self",
            )
            if adapter.norm_placement is not None:
                rec.norm_placement = adapter.norm_placement
            if self.heads is not None and max(self.heads) >= adapter.n_heads:
                raise ValueError(f"heads={self.heads} but layer {name!r} has {adapter.n_heads} heads")
            self.layers.append(rec)
            self._contexts.append(_LayerContext(self, rec, adapter))
            if block_name is not None:
                self._blocks[block_name] = modules[block_name]
        self._assign_stacks(
            [(n, _is_cross(n, m, modules.get(n.rpartition(".")[0]) if n else None)) for n, m, _ in found]
        )
        missing = [
            f"{r.name} ({r.adapter.missing_projections_reason})" for r in self.layers if not r.has_weights
        ]
        if missing:
            warnings.warn(
                "thetascope: projection weights not found for " + ", ".join(missing) + "; theta, entropy, "
                "max_logit and the attention-input norm are measured there, G_l, S_l and the bound are not.",
                UserWarning,
                stacklevel=3,
            )

    def _assign_stacks(self, found: list[tuple[str, bool]]) -> None:
        """Encoder-decoder models: ``stack`` per layer and ``index`` in depth order within each stack.

        ``found`` holds ``(name, is_cross)`` of every found layer in depth order (selected or not). A model is
        split into stacks only when its layers live under exactly one encoder and one decoder module.
        """
        roots = [_stack_root(n) for n, _ in found]
        if None in roots or {r[1] for r in roots if r} != {"encoder", "decoder"} or len(set(roots)) != 2:
            return  # one stack: index stays the depth order over all found layers
        where: dict[str, tuple[str, int]] = {}
        counts: dict[str, int] = {}
        for (name, cross), root in zip(found, roots):
            assert root is not None
            stack = "decoder_cross" if root[1] == "decoder" and cross else root[1]
            where[name] = (stack, counts.get(stack, 0))
            counts[stack] = where[name][1] + 1
        for r in self.layers:
            r.stack, r.index = where[r.name]

    @staticmethod
    def _block_of(name: str, modules: dict[str, nn.Module]) -> str | None:
        parts = name.split(".")
        # Deepest strict ancestor whose parent is a ModuleList/Sequential (the block list).
        for cut in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[: cut - 1])
            if isinstance(modules.get(parent), nn.ModuleList | nn.Sequential):
                return ".".join(parts[:cut])
        return None

    # ---------------------------------------------------------------------------------------------- sampling
    def _select(self, batch: int, heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
        nb = batch if self.batch_size is None else min(batch, self.batch_size)
        hi = self._index(range(heads) if self.heads is None else self.heads, device)
        return self._index(range(nb), device), hi

    def _index(self, values: Sequence[int], device: torch.device) -> Tensor:
        """``values`` as a long tensor on ``device``, made once per values and device (read-only: shared)."""
        key = (tuple(values), device)
        t = self._indices.get(key)
        if t is None:
            with torch.inference_mode(False):  # usable after a capture run under inference mode, too
                t = self._indices[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return t

    def _selects_all(self, batch: int, heads: int) -> tuple[bool, bool]:
        all_items = self.batch_size is None or self.batch_size >= batch
        return all_items, self.heads is None or self.heads == list(range(heads))

    def _sample_rows(self, batch: int, heads: int, q_len: int, device: torch.device) -> Tensor:
        nb = batch if self.batch_size is None else min(batch, self.batch_size)
        nh = heads if self.heads is None else len(self.heads)
        if self.rows_per_head is None or self.rows_per_head >= q_len:
            return cached_arange(q_len, device).expand(nb, nh, q_len)
        # One draw serves as many kernel calls as there are layers (one host-to-device copy for all of them on
        # an accelerator), head-major ([H', B', R] in memory), so the adapters' row indices need no copy. A
        # capture's draws depend only on the seed, the capture count and the order of the calls.
        key = (nb, nh, q_len, device)
        pool = self._draws.get(key)
        if not pool:
            n = max(1, min(len(self.layers), _DRAW_ELEMENTS // (nb * nh * q_len)))
            scores = torch.rand((n, nh, nb, q_len), generator=self._gen)
            pos = scores.topk(self.rows_per_head, dim=-1).indices.sort(dim=-1).values.to(device)
            pool = self._draws[key] = list(pos.transpose(1, 2).unbind(0))[::-1]  # each [B', H', R]
        return pool.pop()

    # ---------------------------------------------------------------------------------------------- recording
    def _record(self, ctx: _LayerContext, logits: Tensor, pos: Tensor, valid: Tensor | None) -> None:
        # On accelerators the rows wait for those of the other layers (measured together in _settle): that
        # saves the launches of all but one layer in each bracket block and in every row operation. On CPU
        # they are measured at once.
        logits = logits.detach().float()
        # Adapters may hand rows laid out head-major ([H', B'] in memory): measured in that order, they need
        # no copy; the values are swapped back in _measure_rows.
        swapped = logits.dim() >= 3 and not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous()
        if swapped:
            logits = logits.transpose(0, 1)
            valid = valid.transpose(0, 1) if valid is not None else None
        if self._pending and self._pending_elements + logits.numel() > _PENDING_ELEMENTS:
            self._settle()  # before, not after: a settlement then fills at most one bracket block on a GPU
        self._pending.append(_PendingRows(ctx, logits, valid, pos, swapped))
        self._pending_elements += logits.numel()
        if not _defers(logits.device):
            self._settle()

    def _settle(self) -> None:
        """Measure the pending rows (classification, softmax, bracket, entropy) and store them, in call order.

        The rows of every pending kernel call of one row length and device are measured together (rows are
        independent: the values are those of one measurement per kernel call). A failure there is retried
        call by call, so it disables only the layer whose rows fail.
        """
        items, self._pending, self._pending_elements = self._pending, [], 0
        measured: dict[int, _RowValues | Exception] = {}
        groups: dict[tuple[torch.device, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.logits.device, item.logits.shape[-1]), []).append(i)
        for members in groups.values():
            if len(members) > 1:
                try:
                    measured.update(zip(members, self._measure_rows([items[i] for i in members])))
                    continue
                except Exception:
                    pass  # measured call by call below, so the failure is charged to its layer
            for i in members:
                try:
                    measured[i] = self._measure_rows([items[i]])[0]
                except Exception as err:
                    measured[i] = err
        for i, item in enumerate(items):
            result = measured[i]
            if item.ctx.layer.disabled:
                continue  # an earlier call of this layer failed in this capture
            try:
                if isinstance(result, Exception):
                    raise result
                self._store(item, result)
            except Exception as err:
                self._fail_layer(item.ctx, err)

    def _measure_rows(self, items: list[_PendingRows]) -> list[_RowValues]:
        """The values of the rows of ``items`` (one row length, one device), each op run once for all."""
        from thetascope.functional.theta import attention_entropy, balanced_mass_factor

        n_keys = items[0].logits.shape[-1]
        shapes = [item.logits.shape[:-1] for item in items]
        sizes = [math.prod(shape) for shape in shapes]
        if len(items) == 1:
            flat = items[0].logits.reshape(-1, n_keys)
        else:
            flat = torch.cat([item.logits.reshape(-1, n_keys) for item in items])  # [N, S]
        row_max, masked, nonfinite = classify_rows(flat)
        for item, m, nf in zip(items, masked.split(sizes), nonfinite.split(sizes)):
            if item.valid is not None:  # in place on this call's part of the joint masks
                keep = item.valid.to(torch.bool).reshape(-1)
                m.logical_or_(~keep)
                nf.logical_and_(keep)
        # bad rows come out of softmax as NaN (or anything); every value of theirs is replaced by NaN below
        probs = torch.softmax(flat, dim=-1)
        theta = balanced_mass_factor(probs, exact_top=self.exact_top, validate=False)
        entropy = attention_entropy(probs)
        rows = torch.stack([theta.lower, theta.upper, entropy, row_max.to(theta.lower.dtype)])  # [4, N]
        rows = torch.where(masked | nonfinite, float("nan"), rows)
        if len(set(sizes)) == 1:  # the usual case: every call the same shape, one sum for all
            counts = torch.stack([masked, nonfinite]).view(2, len(items), sizes[0]).sum(dim=-1)  # [2, K]
            n_masked, n_nonfinite = list(counts[0].unbind()), list(counts[1].unbind())
        else:
            n_masked = [m.sum() for m in masked.split(sizes)]
            n_nonfinite = [nf.sum() for nf in nonfinite.split(sizes)]
        out = []
        for k, (item, part) in enumerate(zip(items, rows.split(sizes, dim=1))):
            lower, upper, ent, max_logit = (
                t.view(shapes[k]).transpose(0, 1) if item.swapped else t.view(shapes[k])
                for t in part.unbind(0)
            )
            out.append(_RowValues(lower, upper, ent, max_logit, n_masked[k], n_nonfinite[k]))
        return out

    def _store(self, item: _PendingRows, values: _RowValues) -> None:
        ctx, pos = item.ctx, item.pos
        device = item.logits.device
        rec = ctx.layer
        # every per-row value of a bad row is NaN; max_logit is row_max_logit, from the same reduction
        lower, upper, entropy, max_logit = values.lower, values.upper, values.entropy, values.max_logit
        n_masked, n_nonfinite = values.n_masked, values.n_nonfinite
        if ctx.recorded_in == self._n_captures and rec.theta is not None:
            # A further kernel call of this module in the same capture: its rows join the earlier ones.
            assert rec.entropy is not None
            assert rec.max_logit is not None
            assert rec.query_positions is not None
            assert rec.n_masked_rows is not None
            assert rec.n_nonfinite_rows is not None
            lower = _cat_rows(rec.theta.lower, lower)
            upper = _cat_rows(rec.theta.upper, upper)
            entropy = _cat_rows(rec.entropy, entropy)
            max_logit = _cat_rows(rec.max_logit, max_logit)
            pos = _cat_rows(rec.query_positions, pos, fill=-1)
            n_masked = n_masked + rec.n_masked_rows
            n_nonfinite = n_nonfinite + rec.n_nonfinite_rows
            rec.n_kernel_calls += 1
        else:
            ctx.recorded_in = self._n_captures
            rec.n_captures += 1
            rec.n_kernel_calls = 1
        rec.theta = ThetaBounds(lower, upper)
        rec.entropy = entropy
        rec.max_logit = max_logit
        rec.query_positions = pos
        rec.batch_index = self._index(range(pos.shape[0]), device)
        rec.head_index = self._index(range(pos.shape[1]) if self.heads is None else self.heads, device)
        rec.n_masked_rows = n_masked
        rec.n_nonfinite_rows = n_nonfinite

    # ---------------------------------------------------------------------------------------------- hooks
    def _install(self, purpose: str) -> None:
        if self._installed_for is not None:
            self._installed_for = "capture" if "capture" in (purpose, self._installed_for) else purpose
            return
        self._installed_for = purpose
        for ctx in self._contexts:
            if hasattr(ctx.adapter, "on_install"):  # optional hook (torch_mha: MHA fast path off)
                ctx.adapter.on_install()
            module = ctx.adapter.module
            if ctx.adapter.route == "interface":
                hf.activate(module, ctx.run_interface)
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(ctx), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._make_post_hook(ctx), always_call=True))

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ctx in self._contexts:
            if ctx.adapter.route == "interface":
                hf.deactivate(ctx.adapter.module)
            if hasattr(ctx.adapter, "on_uninstall"):
                ctx.adapter.on_uninstall()
        self._installed_for = None

    def _make_pre_hook(self, ctx: _LayerContext) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ctx.done = False
            ctx.recording = self._recording and not ctx.layer.disabled
            if ctx.recording and torch.compiler.is_compiling():
                # Measuring inside a compiled graph would bake sampling into it; measure eagerly instead.
                ctx.recording = False
                self._compiled_seen = True
            if ctx.recording:
                try:
                    self._on_attention_start(ctx, args, kwargs)
                except Exception as err:
                    self._fail_layer(ctx, err)
            if ctx.adapter.route != "interface":  # the interface route is reached through its own wrapper
                # An unrecorded forward at tau != 1 needs only the temperature: adapters that can apply it to
                # what the module reads spare the forward a mode (on CPU ~0.15 ms per torch MHA forward).
                shadow = not ctx.recording and self._temp_on
                undo = ctx.adapter.enter_temperature(module, ctx) if shadow else None
                if undo is None:
                    mode = _KernelMode(ctx)
                    mode.__enter__()
                    undo = partial(mode.__exit__, None, None, None)
                ctx.exits.append(undo)

        return pre_hook

    def _make_post_hook(self, ctx: _LayerContext) -> Callable[..., None]:
        def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if ctx.exits and ctx.adapter.route != "interface":
                ctx.exits.pop()()
            if ctx.recording and not ctx.done and ctx.layer.name not in self._unobserved_warned:
                self._unobserved.append(f"{ctx.layer.name} ({type(module).__name__})")
            ctx.recording = False

        return post_hook

    def _on_attention_start(self, ctx: _LayerContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from thetascope.functional.norms import max_token_norm

        u = ctx.adapter.attention_input(args, kwargs)
        if u is not None:
            ctx.layer.attn_input_max_norm = max_token_norm(u.detach().reshape(-1, u.shape[-1]))
        self._order.append(("attn", ctx.layer.name))

    # ---------------------------------------------------------------------------------------------- capture
    @contextmanager
    def capture(self) -> Iterator[AttentionProbe]:
        """Measure the attention of every forward run inside the block (normally one).

        Installs the hooks on entry and removes them on exit (unless a temperature != 1 keeps them). Sampling
        is reseeded from ``seed`` and a capture counter, so a run is reproducible.

        Example:
            >>> import torch
            >>> from transformers import BertConfig, BertModel
            >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ...                              intermediate_size=64, vocab_size=50)).eval()
            >>> probe = AttentionProbe(model, rows_per_head=None)
            >>> with probe.capture():
            ...     _ = model(torch.randint(0, 50, (2, 6)))
            >>> probe.layers[0].norm_placement, probe.layers[0].theta.upper.shape
            ('post', torch.Size([2, 4, 6]))
        """
        if self._recording:
            raise RuntimeError("AttentionProbe.capture() is already active")
        self._gen.manual_seed(self.seed * 1_000_003 + self._n_captures)
        self._draws = {}
        self._n_captures += 1
        self._install("capture")
        self._recording = True
        self._order: list[tuple[str, str]] = []
        extra = self._install_block_hooks()
        try:
            yield self
        except BaseException:
            self._pending, self._pending_elements = [], 0  # the forward failed: its rows are not measured
            raise
        finally:
            self._recording = False
            self._settle()  # the rows still pending (strict=True: a failure raises here)
            if self._compiled_seen:
                self._warn_once(
                    "compiled-capture",
                    "thetascope: capture() saw attention layers run inside a torch.compile graph and did not "
                    "measure them there. Run the measurement forward on the uncompiled module "
                    "(probe.model, i.e. compiled._orig_mod), e.g. under torch.no_grad().",
                )
            for h in extra:
                h.remove()
            self._warn_unobserved()
            self._finish_norm_placement()
            if self._temp_on:  # the temperature (possibly changed inside the block) keeps its hooks
                self._installed_for = "temperature"
            else:
                self._uninstall()

    def _warn_unobserved(self) -> None:
        if not self._unobserved:
            return
        self._unobserved_warned.update(n.partition(" (")[0] for n in self._unobserved)
        warnings.warn(
            "thetascope: no attention kernel was observed in "
            + ", ".join(self._unobserved)
            + "; theta was not measured there. The module's kernel is invisible to the probe (e.g. a custom "
            "CUDA kernel called directly). Remedy: run it through a kernel the probe sees "
            "(attn_implementation='sdpa' or 'eager' for transformers models, F.scaled_dot_product_attention "
            "for your own), or register an adapter (thetascope.capture.register_adapter).",
            UserWarning,
            stacklevel=3,
        )
        self._unobserved = []

    def _install_block_hooks(self) -> list[RemovableHandle]:
        from thetascope.functional.norms import max_token_norm

        handles: list[RemovableHandle] = []
        block_layers: dict[str, list[LayerRecord]] = {}
        for rec in self.layers:
            if rec.block_name is not None:
                block_layers.setdefault(rec.block_name, []).append(rec)
        for bname, recs in block_layers.items():
            block = self._blocks[bname]

            def block_pre(
                module: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                recs: list[LayerRecord] = recs,
            ) -> None:
                if torch.compiler.is_compiling():
                    return
                x = kwargs.get("hidden_states", kwargs.get("x"))
                if not isinstance(x, Tensor):
                    x = next((a for a in args if isinstance(a, Tensor)), None)
                if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2:
                    n = max_token_norm(x.detach().reshape(-1, x.shape[-1]))
                    for r in recs:
                        r.residual_max_norm = n

            handles.append(block.register_forward_pre_hook(block_pre, with_kwargs=True))
            if any(r.norm_placement is None for r in recs):
                for mname, m in block.named_modules(prefix=bname):
                    if _is_norm(m):

                        def norm_pre(module: nn.Module, args: tuple[Any, ...], mname: str = mname) -> None:
                            self._order.append(("norm", mname))

                        handles.append(m.register_forward_pre_hook(norm_pre))
        return handles

    def _finish_norm_placement(self) -> None:
        order = getattr(self, "_order", [])
        for rec in self.layers:
            if rec.norm_placement is not None:
                continue
            if rec.block_name is None:
                rec.norm_placement = "none"
                continue
            prefix = rec.block_name + "."
            events = [
                (kind, n) for kind, n in order if n == rec.name or (kind == "norm" and n.startswith(prefix))
            ]
            try:
                first_attn = events.index(("attn", rec.name))
            except ValueError:
                continue  # layer did not run; decide on a later capture
            norms = [n for kind, n in events if kind == "norm"]
            before = [n for kind, n in events[:first_attn] if kind == "norm"]
            rec.norm_placement = "pre" if before else ("post" if norms else "none")
        self._order = []

    # -------------------------------------------------------------------------------------------- temperature
    @property
    def temperature(self) -> float:
        """The current attention temperature tau (logits are divided by it)."""
        return self._tau

    def set_temperature(self, tau: float) -> None:
        """Divide the attention logits of every found layer by ``tau`` on every forward from now on.

        tau lives in one 0-dim tensor per device, updated in place, so changing it never recompiles a
        ``torch.compile``-d model. While tau != 1 the hooks stay installed (training steps included); at
        tau == 1 they are removed and the model runs bitwise as without a probe. No Lightning callback has to
        enter or exit anything: calling this once per step (e.g. in ``on_train_batch_start``) is enough.

        Args:
            tau: a finite positive float.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from transformers import GPT2Config, GPT2Model
            >>> model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).eval()
            >>> probe = AttentionProbe(model)
            >>> x = torch.randint(0, 20, (1, 5))
            >>> y1 = model(x).last_hidden_state
            >>> probe.set_temperature(3.0)
            >>> bool((model(x).last_hidden_state - y1).abs().max() > 0)
            True
            >>> probe.set_temperature(1.0)
            >>> torch.equal(model(x).last_hidden_state, y1)
            True
        """
        tau = float(tau)
        if not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a finite positive float, got {tau!r}")
        self._tau = tau
        self._temp_on = tau != 1.0
        for device in self._param_devices():
            self._inv_tau_on(device)
        for t in self._inv_tau.values():
            t.fill_(1.0 / tau)
        if tau != 1.0:
            if self._compiled:
                self._warn_once(
                    "compiled-temp",
                    "thetascope: temperature hooks installed on the module inside a torch.compile wrapper; "
                    "tau changes reuse the compiled graph (tau is a tensor), but switching between tau == 1 "
                    "and tau != 1 installs/removes hooks and may compile once more.",
                )
            self._install("temperature")
        elif self._installed_for == "temperature":
            self._uninstall()

    @contextmanager
    def temperature_active(self, tau: float) -> Iterator[AttentionProbe]:
        """Set the temperature for the duration of a block, then restore the previous one.

        Example:
            >>> import torch
            >>> from transformers import GPT2Config, GPT2Model
            >>> model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).eval()
            >>> probe = AttentionProbe(model)
            >>> with probe.temperature_active(2.0):
            ...     _ = model(torch.randint(0, 20, (1, 4)))
            >>> probe.temperature, probe.is_installed
            (1.0, False)
        """
        previous = self._tau
        self.set_temperature(tau)
        try:
            yield self
        finally:
            self.set_temperature(previous)

    def _param_devices(self) -> set[torch.device]:
        return {p.device for p in self.model.parameters()} or {torch.device("cpu")}

    def _default_device(self) -> torch.device:
        return next(iter(self._param_devices()))

    def _inv_tau_on(self, device: torch.device) -> Tensor:
        t = self._inv_tau.get(device)
        if t is None:
            t = torch.full((), 1.0 / self._tau, dtype=torch.float32, device=device)
            self._inv_tau[device] = t
        return t

    # ---------------------------------------------------------------------------------------------- misc
    def _fail_layer(self, ctx: _LayerContext, err: Exception) -> None:
        """A measurement of ``ctx.layer`` raised: re-raise under ``strict``, else warn once and stop measuring
        that layer."""
        if self.strict:
            raise err
        ctx.layer.disabled = True
        ctx.recording = False
        self._warn_once(
            f"fail:{ctx.layer.name}",
            f"thetascope: measuring {ctx.layer.name} ({ctx.layer.kind}) failed with {type(err).__name__}: "
            f"{err}; this layer is no longer measured (strict=True raises).",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def state_dict(self) -> dict[str, int]:
        """Plain data that makes row sampling resume exactly: the sampler is reseeded from ``seed`` and the
        number of captures so far."""
        return {"seed": self.seed, "n_captures": self._n_captures}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the seed given at construction is kept)."""
        self._n_captures = int(state_dict["n_captures"])

    def remove(self) -> None:
        """Remove every hook and reset the temperature to 1."""
        self._tau = 1.0
        self._temp_on = False
        for t in self._inv_tau.values():
            t.fill_(1.0)
        self._uninstall()

    @property
    def is_installed(self) -> bool:
        """Whether any hook is installed on the model now."""
        return bool(self._handles)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        kinds = sorted({r.kind for r in self.layers})
        return f"AttentionProbe({len(self.layers)} layers, kinds={kinds}, tau={self._tau})"
