"""CurvatureCore: sharpness against the optimizer's stability threshold, traces per block, the Taylor check.

Framework-free: a plain loop, Fabric or the Lightning callback drives it the same way::

    core = CurvatureCore(model)
    for step, batch in enumerate(loader):
        loss = model.loss(*batch); loss.backward()
        measuring = step % 100 == 0
        if measuring:
            core.snapshot(opt)              # θ_t and the step's learning rates, before the update
        opt.step(); opt.zero_grad()
        if measuring:                       # curvature at θ_t; the Taylor check of the step just taken
            vals = core.measure(lambda: model.loss(*batch), opt, all_reduce=distributed_all_reduce_mean())
            logged = core.reduce(vals)
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from thetascope.functional.curvature import (
    HVP,
    AllReduce,
    adam_preconditioner,
    compute_dtype,
    double_backward_hvp,
    finite_difference_hvp,
    flatten,
    group_mean_stderr,
    hutchinson_samples,
    lanczos_top,
    power_iteration_top,
    preconditioned,
    stability_threshold,
    taylor_prediction,
)
from thetascope.functional.gradients import layer_index_of
from thetascope.keys import CURVATURE_SUBLAYER_TYPES, DEFAULT_PREFIX, layer_key, trace_type_key
from thetascope.monitors._collective import AllGather, PackedValues, local_all_gather, reduce_packed
from thetascope.monitors._guard import FailureGuard

__all__ = [
    "BACKENDS",
    "METHODS",
    "CurvatureCore",
    "distributed_all_reduce_mean",
    "parameter_segments",
    "sublayer_type",
]

#: ``backend=`` values: ``"auto"`` tries them in this order after itself.
BACKENDS: tuple[str, ...] = ("auto", "double_backward", "math_sdpa", "finite_difference")
#: ``method=`` values for the top eigenvalue.
METHODS: tuple[str, ...] = ("lanczos", "power")

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
    )
    if t is not None
)
_FUSED_QKV = re.compile(r"(?:^|\.)(?:c_attn|qkv|Wqkv|in_proj)(?:\.weight|\.bias|_weight|_bias)$")
_INTERLEAVED_QKV = re.compile(r"(?:^|\.)query_key_value\.")
_ATTN = re.compile(r"(?:^|\.)[^.]*(?:attn|attention)[^.]*\.", re.IGNORECASE)
_PROJ = (
    ("attn_q", re.compile(r"(?:^|\.)(?:q_proj|query|q|wq|q_lin|to_q)(?:\.|_weight|_bias)")),
    ("attn_k", re.compile(r"(?:^|\.)(?:k_proj|key|k|wk|k_lin|to_k)(?:\.|_weight|_bias)")),
    ("attn_v", re.compile(r"(?:^|\.)(?:v_proj|value|v|wv|v_lin|to_v)(?:\.|_weight|_bias)")),
)
_ATTN_OUT = re.compile(r"(?:^|\.)(?:o_proj|out_proj|c_proj|wo|out_lin|proj|dense|to_out)(?:\.|$)")
_FFN = re.compile(
    r"(?:^|\.)(?:mlp|ffn|feed_forward|feedforward|intermediate|output|fc1|fc2|c_fc|gate_proj|up_proj|"
    r"down_proj|w1|w2|w3|wi|wo)(?:\.|$)"
)
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|head|classifier|score|output_projection)(?:\.|$)")


def sublayer_type(name: str, module: nn.Module | None) -> str:
    """The sublayer type of parameter ``name`` owned by ``module`` (one of ``CURVATURE_SUBLAYER_TYPES``).

    Fused Q/K/V projections (``c_attn``, ``qkv``, ``in_proj_weight``) come back as ``"attn_qkv"``; the
    segments of :func:`parameter_segments` split them into thirds.

    Example:
        >>> sublayer_type("transformer.h.0.attn.c_proj.weight", nn.Linear(2, 2))
        'attn_o'
        >>> sublayer_type("model.layers.3.mlp.down_proj.weight", nn.Linear(2, 2))
        'ffn'
        >>> sublayer_type("blocks.1.ln_1.weight", nn.LayerNorm(2))
        'norm'
        >>> sublayer_type("wte.weight", nn.Embedding(2, 2))
        'embedding'
    """
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _NORM_TYPES) or (module is not None and "norm" in type(module).__name__.lower()):
        return "norm"
    if _FUSED_QKV.search(name) or _INTERLEAVED_QKV.search(name):
        return "attn_qkv"
    in_attn = bool(_ATTN.search(name)) or isinstance(module, nn.MultiheadAttention)
    if in_attn:
        for kind, pattern in _PROJ:
            if pattern.search(name):
                return kind
        if _ATTN_OUT.search(name):
            return "attn_o"
    if _FFN.search(name):
        return "ffn"
    if _HEAD.search(name):
        return "head"
    return "other"


def parameter_segments(
    names: Sequence[str], params: Sequence[Tensor], modules: Sequence[nn.Module | None]
) -> tuple[list[int], list[int], list[str]]:
    """Split the flat parameter vector into segments: ``(lengths, layer per segment (-1: none), type)``.

    Fused Q/K/V weights stacked along dim 0 (``c_attn``, ``qkv``, ``in_proj``) become three segments
    ``attn_q``, ``attn_k``, ``attn_v``: their rows are contiguous in the flattened vector. Interleaved layouts
    (``query_key_value``) stay one ``attn_qkv`` segment.

    Example:
        >>> attn = nn.Linear(4, 12)
        >>> parameter_segments(["h.0.attn.c_attn.weight"], [attn.weight], [attn])
        ([16, 16, 16], [0, 0, 0], ['attn_q', 'attn_k', 'attn_v'])
    """
    lengths: list[int] = []
    layers: list[int] = []
    kinds: list[str] = []
    for name, p, mod in zip(names, params, modules):
        layer = layer_index_of(name)
        layer = -1 if layer is None else layer
        kind = sublayer_type(name, mod)
        if kind == "attn_qkv" and _FUSED_QKV.search(name) and p.dim() >= 1 and p.shape[0] % 3 == 0:
            third = p.numel() // 3
            for k in ("attn_q", "attn_k", "attn_v"):
                lengths.append(third)
                layers.append(layer)
                kinds.append(k)
            continue
        lengths.append(p.numel())
        layers.append(layer)
        kinds.append(kind)
    return lengths, layers, kinds


def distributed_all_reduce_mean(group: object | None = None) -> AllReduce:
    """Average a tensor over the ranks of a ``torch.distributed`` group (identity when not initialised).

    The HVPs need it: ``torch.autograd.grad`` bypasses DDP's gradient hooks, so nothing averages the
    products of the ranks' local losses unless we do.
    """

    def reduce(t: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return t
        world = dist.get_world_size(group)  # type: ignore[arg-type]
        if world == 1:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, group=group)
        return out / world

    return reduce


def _identity(t: Tensor) -> Tensor:
    return t


def _is_dtensor(p: Tensor) -> bool:
    return any(c.__name__ == "DTensor" for c in type(p).__mro__)


class CurvatureCore:
    """Loss curvature on a held batch, measured between optimizer steps without disturbing training.

    On each :meth:`measure` the core reports (keys from :mod:`thetascope.keys`, prefixed):

    * ``curvature/sharpness``: the top Hessian eigenvalue of the loss (Lanczos or power iteration on HVPs,
      warm-started from the previous measurement's eigenvector), and ``curvature/sharpness_residual``
      ``‖Hx − λx‖/|λ|`` saying how converged it is;
    * for Adam/AdamW ``curvature/precond_sharpness`` ``λ_max(P⁻¹H)`` with the optimizer's own
      bias-corrected second moment (and eps) as ``P``;
    * ``curvature/threshold``: the optimizer's stability threshold for the step's learning rate (2/lr for
      GD, ``(2 + 2β)/lr`` with momentum, ``(2 + 2β₁)/((1 − β₁) lr)`` for Adam), and the headline
      ``curvature/stability_ratio``: the matching sharpness over it (1 = the edge of stability);
    * ``curvature/trace`` (Hutchinson) with its standard error, per block (``curvature/trace/layer_XX``) and
      per sublayer type (``curvature/trace_type/{attn_q,attn_k,attn_v,attn_o,ffn,norm,embedding,head,...}``);
    * the Taylor check of the step taken since :meth:`snapshot`: ``curvature/taylor_first`` (``gᵀΔθ``),
      ``curvature/taylor_second`` (``+ ½ΔθᵀHΔθ``), the observed ``curvature/loss_change`` on the same batch
      and ``curvature/taylor_ratio`` (observed / second order).

    Parameters, ``.grad``, optimizer state, buffers, the CPU and CUDA RNG states and every module's
    train/eval mode are exactly as before a measurement. The measurement runs in eval mode unless
    ``train_mode=True`` (then dropout masks are re-drawn from one seed for every loss evaluation, so all
    HVPs see the same function). Under data parallelism pass ``all_reduce`` (see
    :func:`distributed_all_reduce_mean`): losses, gradients and every HVP are averaged across ranks, so every
    rank computes the Hessian of the global loss. Sharded parameters (FSDP2 ``DTensor``) are refused.

    Args:
        model: the module whose parameters (or the optimizer's, when given to :meth:`measure`) are measured.
        method: ``"lanczos"`` (default; memory ``iters`` vectors) or ``"power"`` (two vectors).
        iters: HVPs per eigenvalue (>= 1).
        trace_samples: Hutchinson probe vectors per measurement (0 disables traces; >= 2 for a standard
            error).
        backend: ``"auto"`` (double backward if the model's kernels have it, else SDPA's math kernel, else
            finite differences), ``"double_backward"``, ``"math_sdpa"`` or ``"finite_difference"``.
        fd_step: relative finite-difference step (default per dtype, see
            :func:`~thetascope.functional.curvature.fd_step`).
        train_mode: measure in train mode (dropout on, with a fixed mask) instead of eval mode.
        precondition: compute Adam's preconditioned sharpness.
        seed: seed of the random start, Hutchinson probes and (``train_mode``) dropout masks.
        prefix: key prefix.
        strict: raise on a failed measurement instead of warning once and disabling it.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> core = CurvatureCore(net, iters=20, trace_samples=4)
        >>> out = core.reduce(core.measure(lambda: ((net(x) - y) ** 2).mean()))
        >>> out["stability/curvature/sharpness"] > 0, core.backend
        (True, 'double_backward')
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "lanczos",
        iters: int = 20,
        trace_samples: int = 4,
        backend: str = "auto",
        fd_step: float | None = None,
        train_mode: bool = False,
        precondition: bool = True,
        seed: int = 0,
        prefix: str = DEFAULT_PREFIX,
        strict: bool = False,
    ) -> None:
        from thetascope._validation import check_bool, check_choice, check_positive_int, check_prefix

        check_choice("method", method, list(METHODS))
        check_choice("backend", backend, list(BACKENDS))
        if fd_step is not None and (
            isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)) or not 0 < fd_step < 1
        ):
            raise ValueError(f"fd_step must be None or a number in (0, 1), got {fd_step!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.model = model
        self.method = method
        self.iters = check_positive_int("iters", iters)
        self.trace_samples = check_positive_int("trace_samples", trace_samples, minimum=0)
        self.backend_choice = backend
        self.fd_step = None if fd_step is None else float(fd_step)
        self.train_mode = check_bool("train_mode", train_mode)
        self.precondition = check_bool("precondition", precondition)
        self.seed = seed
        self.prefix = check_prefix(prefix)
        self.guard = FailureGuard(type(self).__name__, check_bool("strict", strict))
        self._refuse_sharded(list(model.parameters()))
        #: The backend in use once :meth:`measure` has run (``"auto"`` resolved), and why it was chosen.
        self.backend: str | None = None if backend == "auto" else backend
        self.backend_note: str = ""
        self.count = 0
        self._vectors: dict[str, Tensor] = {}
        self._snapshot: tuple[list[Tensor], list[float]] | None = None
        self._segments: tuple[tuple[int, ...], list[int], Tensor, Tensor, list[int]] | None = None
        self.layer_ids: list[int] = []

    # ------------------------------------------------------------------------------------------ parameters
    @staticmethod
    def _refuse_sharded(params: Sequence[Tensor]) -> None:
        if any(_is_dtensor(p) for p in params):
            raise RuntimeError(
                "CurvatureCore does not support sharded parameters (FSDP2 / DTensor): each rank holds only a "
                "shard, so its Hessian-vector products would be products of shards. Measure an unsharded "
                "or DDP-replicated model instead."
            )

    def parameters(self, optimizer: torch.optim.Optimizer | None = None) -> list[Tensor]:
        """The measured parameters: the optimizer's (group order) or the model's; trainable, deduplicated."""
        source = (
            [p for g in optimizer.param_groups for p in g["params"]]
            if optimizer is not None
            else list(self.model.parameters())
        )
        seen: set[int] = set()
        out: list[Tensor] = []
        for p in source:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        self._refuse_sharded(out)
        return out

    def _segments_for(self, params: Sequence[Tensor]) -> tuple[list[int], Tensor, Tensor, list[int]]:
        key = tuple(id(p) for p in params)
        if self._segments is None or self._segments[0] != key:
            name_of: dict[int, str] = {}
            for name, p in self.model.named_parameters(remove_duplicate=False):
                name_of.setdefault(id(p), name)
            names = [name_of.get(id(p), f"param_{i}") for i, p in enumerate(params)]
            modules: list[nn.Module | None] = []
            for n in names:
                try:
                    modules.append(self.model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else self.model)
                except AttributeError:
                    modules.append(None)
            lengths, layers, kinds = parameter_segments(names, params, modules)
            layer_ids = sorted({i for i in layers if i >= 0})
            pos = {lid: j for j, lid in enumerate(layer_ids)}
            # segments outside every block go to a last "no layer" column that is not logged per layer
            seg_layer = torch.tensor([pos.get(i, len(layer_ids)) for i in layers], dtype=torch.long)
            seg_type = torch.tensor([CURVATURE_SUBLAYER_TYPES.index(k) for k in kinds], dtype=torch.long)
            self._segments = (key, lengths, seg_layer, seg_type, layer_ids)
        _, lengths, seg_layer, seg_type, layer_ids = self._segments
        self.layer_ids = layer_ids
        return lengths, seg_layer, seg_type, layer_ids

    # ------------------------------------------------------------------------------------------ protocol
    def snapshot(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Record θ_t (and the learning rates of the coming step) before ``optimizer.step()``.

        Call it only on measurement steps: it copies the parameters once (device memory, no sync). The next
        :meth:`measure` then measures at θ_t and checks the Taylor prediction of the step θ_t → θ_(t+1).
        """
        params = self.parameters(optimizer)
        lrs = [float(g["lr"]) for g in optimizer.param_groups] if optimizer is not None else []
        self._snapshot = ([p.detach().clone() for p in params], lrs)

    @contextlib.contextmanager
    def _preserved(self, params: Sequence[Tensor]) -> Iterator[None]:
        """Modes, buffers, parameters and RNG states exactly as on entry, whatever happens inside."""
        modules = list(self.model.modules())
        modes = [m.training for m in modules]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        saved = [p.detach().clone() for p in params]
        cuda = (
            list(range(torch.cuda.device_count()))
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else []
        )
        with torch.random.fork_rng(devices=cuda):
            try:
                if not self.train_mode:
                    self.model.eval()
                yield
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
                    for b, s in buffers:
                        b.copy_(s)
                for m, mode in zip(modules, modes):
                    m.training = mode

    def _seeded(
        self, loss_fn: Callable[[], Tensor], context: Callable[[], Any] | None
    ) -> Callable[[], Tensor]:
        seed = self.seed * 1_000_003 + self.count

        def call() -> Tensor:
            torch.manual_seed(seed)  # the same dropout mask for every evaluation (inside fork_rng)
            with context() if context is not None else contextlib.nullcontext():
                loss = loss_fn()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a one-element tensor, got {type(loss).__name__}")
            return loss.reshape(())

        return call

    def _build(
        self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], all_reduce: AllReduce
    ) -> tuple[HVP, Tensor, Tensor]:
        def math_sdpa() -> Any:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.MATH)

        def make(backend: str) -> tuple[HVP, Tensor, Tensor]:
            if backend == "finite_difference":
                return finite_difference_hvp(self._seeded(loss_fn, None), params, all_reduce, self.fd_step)
            ctx = math_sdpa if backend == "math_sdpa" else None
            return double_backward_hvp(self._seeded(loss_fn, ctx), params, all_reduce)

        if self.backend is not None:
            return make(self.backend)
        notes = []
        for backend in ("double_backward", "math_sdpa"):
            try:
                built = make(backend)
                probe = torch.ones(sum(p.numel() for p in params), dtype=compute_dtype(params))
                built[0](probe.to(params[0].device))  # the first product is where missing kernels raise
            except (RuntimeError, NotImplementedError) as err:
                notes.append(f"{backend}: {str(err).splitlines()[0][:160]}")
                continue
            self.backend = backend
            break
        else:
            self.backend = "finite_difference"
            built = make("finite_difference")
        self.backend_note = "; ".join(notes)
        return built

    def measure(
        self,
        loss_fn: Callable[[], Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        all_reduce: AllReduce = _identity,
    ) -> dict[str, Tensor]:
        """Measure on the batch ``loss_fn`` evaluates (called several times; it must not step anything).

        Returns device tensors (no host sync, except inside ``all_reduce``): pass them to :meth:`reduce`.
        Every rank must call it at the same steps (the HVPs are collective under data parallelism).
        """
        params = self.parameters(optimizer)
        snap, self._snapshot = self._snapshot, None
        dtype = compute_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        layer_ids = self._segments_for(params)[3]
        nan = torch.full((), math.nan, dtype=dtype, device=device)
        out: dict[str, Tensor] = {}
        if self.guard.active("curvature") and params:
            try:
                with self._preserved(params):
                    out = self._measure(loss_fn, optimizer, all_reduce, params, snap, dtype, device)
            except Exception as err:
                self.guard.fail("curvature", err)
                out = {}
        self.count += 1
        defaults = {
            "sharpness": nan,
            "sharpness_residual": nan,
            "precond_sharpness": nan,
            "precond_residual": nan,
            "threshold": nan,
            "stability_ratio": nan,
            "loss": nan,
            "trace": nan,
            "trace_stderr": nan,
            "trace_layers": torch.full((len(layer_ids),), math.nan, dtype=dtype, device=device),
            "trace_layers_stderr": torch.full((len(layer_ids),), math.nan, dtype=dtype, device=device),
            "trace_types": torch.full((len(CURVATURE_SUBLAYER_TYPES),), math.nan, dtype=dtype, device=device),
            "trace_types_stderr": torch.full(
                (len(CURVATURE_SUBLAYER_TYPES),), math.nan, dtype=dtype, device=device
            ),
            "taylor_first": nan,
            "taylor_second": nan,
            "loss_change": nan,
            "taylor_ratio": nan,
        }
        merged = {k: out.get(k, v) for k, v in defaults.items()}
        merged["failed"] = torch.tensor(float("curvature" in self.guard.failed_now), device=device)
        return merged

    def _measure(
        self,
        loss_fn: Callable[[], Tensor],
        optimizer: torch.optim.Optimizer | None,
        all_reduce: AllReduce,
        params: list[Tensor],
        snap: tuple[list[Tensor], list[float]] | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        n = sum(p.numel() for p in params)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.count)
        delta: Tensor | None = None
        lrs: list[float] | None = None
        if snap is not None and len(snap[0]) == len(params):
            before, lrs = snap
            lrs = lrs or None
            with torch.no_grad():
                after_loss = all_reduce(self._seeded(loss_fn, None)().detach().to(dtype))
            delta = flatten([p.detach() for p in params], params, dtype) - flatten(before, params, dtype)
            with torch.no_grad():  # measure at θ_t; _preserved puts θ_(t+1) back
                for p, b in zip(params, before):
                    p.copy_(b)
        hvp, loss, grad = self._build(loss_fn, params, all_reduce)
        out["loss"] = loss

        def start(name: str) -> Tensor:
            v = self._vectors.get(name)
            if v is None or v.numel() != n:
                v = torch.randn(n, generator=gen, dtype=dtype)
            return v.to(device=device, dtype=dtype)

        def top(name: str, op: HVP) -> Tensor:
            if self.method == "lanczos":
                res = lanczos_top(op, start(name), self.iters, generator=gen)
            else:
                res = power_iteration_top(op, start(name), self.iters)
            self._vectors[name] = res.vector.detach()
            out[f"{name}_residual"] = res.residual
            return res.value

        out["sharpness"] = top("sharpness", hvp)
        kind_thr = stability_threshold(optimizer, lrs)
        compared: Tensor | None = out["sharpness"]
        if kind_thr is not None and kind_thr[0] == "adam":
            compared = None
            pre = adam_preconditioner(optimizer, params, dtype, lrs) if self.precondition else None  # type: ignore[arg-type]
            if pre is not None:
                out["precond_sharpness"] = top("precond", preconditioned(hvp, pre[0].to(device)))
                compared = out["precond_sharpness"]
        if kind_thr is not None:
            thr = torch.tensor(kind_thr[1], dtype=dtype, device=device)
            out["threshold"] = thr
            if compared is not None:
                out["stability_ratio"] = compared / thr
        if self.trace_samples > 0:
            lengths, seg_layer, seg_type, layer_ids = self._segments_for(params)
            samples = hutchinson_samples(hvp, lengths, self.trace_samples, gen, grad)  # [k, S]
            total, total_se = group_mean_stderr(samples, torch.zeros(len(lengths), dtype=torch.long), 1)
            out["trace"], out["trace_stderr"] = total[0], total_se[0]
            lay, lay_se = group_mean_stderr(samples, seg_layer, len(layer_ids) + 1)
            out["trace_layers"], out["trace_layers_stderr"] = lay[: len(layer_ids)], lay_se[: len(layer_ids)]
            present = torch.zeros(len(CURVATURE_SUBLAYER_TYPES), dtype=torch.bool)
            present[seg_type] = True
            typ, typ_se = group_mean_stderr(samples, seg_type, len(CURVATURE_SUBLAYER_TYPES))
            mask = present.to(device)
            out["trace_types"] = torch.where(mask, typ, torch.full_like(typ, math.nan))
            out["trace_types_stderr"] = torch.where(mask, typ_se, torch.full_like(typ_se, math.nan))
        if delta is not None:
            first, second = taylor_prediction(grad, delta, hvp(delta))
            out["taylor_first"], out["taylor_second"] = first, second
            out["loss_change"] = after_loss - loss
            out["taylor_ratio"] = out["loss_change"] / second
        return out

    def reduce(
        self, values: Mapping[str, Tensor], all_gather: AllGather = local_all_gather
    ) -> dict[str, float]:
        """Full keys to floats with ONE collective; non-finite values are left out; equal on every rank.

        The measured values are already identical on every rank (everything was averaged inside
        :meth:`measure`); the collective agrees on failures, so every rank disables a failed measurement.
        """
        packed = PackedValues()
        for name, value in values.items():
            packed.add(name, value, "max" if name == "failed" else "mean")
        device = values["failed"].device if "failed" in values else None
        red = packed.unpack(reduce_packed(packed, all_gather, device))
        if float(red.get("failed", torch.tensor(0.0))) > 0:
            self.guard.disable_agreed(["curvature"])
        p = self.prefix
        metrics: dict[str, float] = {}
        scalars = (
            "sharpness",
            "sharpness_residual",
            "precond_sharpness",
            "precond_residual",
            "threshold",
            "stability_ratio",
            "loss",
            "trace",
            "trace_stderr",
            "taylor_first",
            "taylor_second",
            "loss_change",
            "taylor_ratio",
        )
        for name in scalars:
            if name in red:
                metrics[f"{p}curvature/{name}"] = float(red[name])
        for col, field in (
            ("trace_layers", "curvature/trace"),
            ("trace_layers_stderr", "curvature/trace_stderr"),
        ):
            if col in red:
                for lid, v in zip(self.layer_ids, red[col].tolist()):
                    metrics[layer_key(p, field, lid)] = v
        for col, se in (("trace_types", False), ("trace_types_stderr", True)):
            if col in red:
                for kind, v in zip(CURVATURE_SUBLAYER_TYPES, red[col].tolist()):
                    metrics[trace_type_key(p, kind, stderr=se)] = v
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    def headline(self, reduced: Mapping[str, float]) -> dict[str, float]:
        """The headline key only (``curvature/stability_ratio``), when it was measured."""
        key = f"{self.prefix}curvature/stability_ratio"
        return {key: reduced[key]} if key in reduced else {}

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors (CPU), the measurement counter (seeds) and the resolved backend."""
        return {
            "vectors": {k: v.detach().cpu() for k, v in self._vectors.items()},
            "count": self.count,
            "backend": self.backend,
            "disabled": sorted(self.guard.disabled),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; vectors move to the parameters' device at the next measurement."""
        vectors = state.get("vectors", {})
        if not isinstance(vectors, Mapping) or not all(isinstance(v, Tensor) for v in vectors.values()):
            raise ValueError("state['vectors'] must map names to tensors")
        self._vectors = {str(k): v.detach().clone() for k, v in vectors.items()}
        self.count = int(state.get("count", 0))
        backend = state.get("backend")
        if self.backend_choice == "auto" and backend in BACKENDS[1:]:
            self.backend = str(backend)
        self.guard.disabled = set(state.get("disabled", []))

    @property
    def vectors(self) -> dict[str, Tensor]:
        """The warm-start eigenvectors by name (``"sharpness"``, ``"precond"``)."""
        return dict(self._vectors)
