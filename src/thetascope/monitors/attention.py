"""AttentionMonitor: theta brackets, B-bar, projection norms, S_l and the Thm 5.1 bound of every layer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from thetascope._validation import (
    check_bool,
    check_layers_arg,
    check_positive_int,
    check_prefix,
    select_layers,
)
from thetascope.capture.introspect import architecture_card, is_compiled
from thetascope.capture.registry import shared_probe
from thetascope.functional.spectral import SpectralNormEstimator
from thetascope.functional.theta import ThetaBounds
from thetascope.functional.theta_stats import (
    DEFAULT_THETA_BINS,
    ENTROPY_INCREMENT_OPS,
    THETA_INCREMENT_OPS,
    ThetaIncrement,
    _entropy_compute,
    _entropy_update,
    _sensitivity_compute,
    _sensitivity_update,
    _theta_compute,
    _theta_update,
)
from thetascope.keys import ATTENTION_LAYER_FIELDS, DEFAULT_PREFIX, TEMPERATURE_FIELD, layer_key
from thetascope.monitors._collective import AllGather, PackedValues, local_all_gather, reduce_packed
from thetascope.monitors._guard import FailureGuard
from thetascope.monitors._sharded import ShardedProjections, model_shard_group

if TYPE_CHECKING:
    from thetascope.capture.probe import AttentionProbe
    from thetascope.capture.records import LayerRecord

__all__ = ["AttentionMonitor", "AttentionSettings", "layer_name"]

#: Quantiles of the theta midpoints that are logged (``theta_p10``); exact across ranks (a summed histogram).
THETA_QUANTILES: tuple[float, ...] = (0.1,)
#: Level of ``theta_frac_099``.
THETA_THRESHOLD = 0.99

# Per-layer values packed into the one collective, in pack order, with their cross-rank op. Theta and entropy
# travel as the increments of functional/theta_stats (sums, counts, maxima, a histogram), so every value
# computed from them after the reduction, percentiles included, equals the single-process value.
_LAYER_OPS: dict[str, str] = {
    **{f"theta/{k}": op for k, op in THETA_INCREMENT_OPS.items()},
    **{f"entropy/{k}": op for k, op in ENTROPY_INCREMENT_OPS.items()},
    "attn_input_max_norm": "max",
    "residual_max_norm": "max",
    "nonfinite_rows": "sum",
    "max_logit": "max",
    "proj_norm": "max",
    # per rank from that rank's theta_h and B-bar: the max over ranks bounds every rank's inputs
    "lipschitz_bound": "max",
    "failed": "max",
}
_RUN_OPS: dict[str, str] = {"tau": "max", "spectral_failed": "max"}
# Reduced per-layer values logged as they are.
_PLAIN_FIELDS = (
    "attn_input_max_norm",
    "residual_max_norm",
    "nonfinite_rows",
    "proj_norm",
    "lipschitz_bound",
    "max_logit",
)
_SEP = "|"  # between the layer name and the field in measure()'s keys (layer names may hold a "/")


def layer_name(rec: LayerRecord) -> str:
    """The name of a layer's measurement (``layer_03``, ``decoder_cross/layer_01``), as warnings show it."""
    base = f"layer_{rec.index:02d}"
    return f"{rec.stack}/{base}" if rec.stack else base


class AttentionSettings:
    """The validated settings of an attention monitor (the core, or its Lightning callback)."""

    rows_per_head: int
    exact_top: int
    layers: str | list[int]
    batch_size: int | None
    power_iters: int | None
    prefix: str
    strict: bool

    def _configure(
        self,
        *,
        rows_per_head: Any,
        exact_top: Any,
        layers: Any,
        batch_size: Any,
        power_iters: Any,
        prefix: Any,
        strict: Any,
    ) -> None:
        """Validate and keep the settings.

        Raises:
            ValueError: naming the argument and what is allowed.
        """
        if isinstance(exact_top, bool) or not isinstance(exact_top, int) or not 1 <= exact_top <= 20:
            raise ValueError(f"exact_top must be an integer in 1..20, got {exact_top!r}")
        self.rows_per_head = check_positive_int("rows_per_head", rows_per_head)
        self.exact_top = exact_top
        self.layers = check_layers_arg(layers)
        self.batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        self.power_iters = None if power_iters is None else check_positive_int("power_iters", power_iters)
        self.prefix = check_prefix(prefix)
        self.strict = check_bool("strict", strict)

    def _settings(self) -> dict[str, Any]:
        """The settings as keyword arguments of :class:`AttentionMonitor`."""
        names = ("rows_per_head", "exact_top", "layers", "batch_size", "power_iters", "prefix", "strict")
        return {name: getattr(self, name) for name in names}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _finite_or_nan(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, math.nan)


class AttentionMonitor(AttentionSettings):
    """Exact attention sensitivity of every attention layer of ``model``, from one captured forward.

    Wrap the forward to be measured in :meth:`capture`, call :meth:`measure` right after it (device tensors,
    no host sync), then :meth:`reduce` (one collective) for the values to log, keyed by full key. Per layer
    (``{prefix}{field}/layer_XX``, or ``{prefix}{field}/{stack}/layer_XX`` in models with several stacks),
    fields :data:`thetascope.keys.ATTENTION_LAYER_FIELDS`:

    * ``theta_max`` / ``theta_max_lower``: the largest certified upper / lower theta bound over the sampled
      query rows (the true max lies between); ``theta_mean``: mean of the bracket midpoints;
      ``theta_frac_099``: fraction of rows whose lower bound is >= 0.99; ``theta_p10``: 10th percentile of
      the midpoints (within 1e-3, from a 1000-bin histogram, so equal in one process and over DDP ranks);
      ``theta_width``: the widest bracket;
    * ``entropy``: mean attention entropy (nats) over the same rows; ``max_logit``: the largest pre-softmax
      logit of the sampled rows (when the capture route records it);
    * ``attn_input_max_norm``: largest token 2-norm of the attention input (the B-bar of Theorem 5.1, the one
      S_l uses); ``residual_max_norm``: the same for the residual stream entering the block;
      ``nonfinite_rows``: rows left out as non-finite;
    * ``proj_norm``: ``G_l = ||W_Q|| ||W_K|| ||W_V|| ||W_O||`` (spectral norms by warm power iteration);
      ``sensitivity``: ``S_l = (theta_max / tau) * B^2 * G_l``; ``lipschitz_bound``: the Theorem 5.1 bound.

    Run-level keys: ``{prefix}theta_max`` and ``{prefix}sensitivity_max`` (max over every layer, the headline
    values) and ``{prefix}temperature``. Values that are not finite are left out. A measurement that fails
    (spectral norms, one layer) warns once and is disabled on every rank; ``strict=True`` raises instead.

    Args:
        model: the model (``torch.compile`` wrappers are measured eagerly).
        rows_per_head: query rows sampled per (batch item, head).
        exact_top: entries enumerated exactly by the theta bracket (1..20).
        layers: which layers' per-layer keys :meth:`reduce` returns: ``"all"``/``None``, ``"auto"`` (first,
            second, middle, second-last, last) or a list of layer positions. Headline maxima cover all layers.
        batch_size: measure only the first ``batch_size`` items of the batch (``None`` = all).
        power_iters: power-iteration steps per measurement (``None`` = the estimator's default).
        prefix: key prefix.
        strict: raise on a failed measurement instead of warning once and disabling it.
        guard: a :class:`~thetascope.monitors._guard.FailureGuard` to share (a callback passes its own).

    Raises:
        ValueError: a bad argument, ``layers`` naming a layer the model does not have, or no attention module
            found in ``model``.

    Example:
        >>> import torch
        >>> from thetascope.demo.model import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8))
        >>> monitor = AttentionMonitor(model, rows_per_head=4)
        >>> with monitor.capture():
        ...     _ = model(torch.randint(0, 16, (2, 8)))
        >>> logged = monitor.reduce(monitor.measure())
        >>> sorted(monitor.headline(logged))
        ['stability/sensitivity_max', 'stability/theta_max']
        >>> 0.0 <= logged["stability/theta_max/layer_01"] <= 1.0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rows_per_head: int = 64,
        exact_top: int = 10,
        layers: str | list[int] | None = None,
        batch_size: int | None = None,
        power_iters: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        strict: bool = False,
        guard: FailureGuard | None = None,
    ) -> None:
        self._configure(
            rows_per_head=rows_per_head,
            exact_top=exact_top,
            layers=layers,
            batch_size=batch_size,
            power_iters=power_iters,
            prefix=prefix,
            strict=strict,
        )
        self.guard = guard if guard is not None else FailureGuard(type(self).__name__, self.strict)
        self.model = model
        # FSDP2: row shards of the projections, taken in the measured forward (see monitors/_sharded.py)
        self._sharded: ShardedProjections | None = None
        self.estimator = (
            SpectralNormEstimator()
            if self.power_iters is None
            else SpectralNormEstimator(n_iter=self.power_iters)
        )
        self.probe: AttentionProbe = shared_probe(
            model, rows_per_head=self.rows_per_head, batch_size=self.batch_size, exact_top=self.exact_top
        )
        select_layers(self.layers, len(self.probe.layers))  # a bad layers= is a configuration error
        self._captures_before: dict[int, int] = {}
        self._together: dict[int, dict[str, Tensor]] = {}
        self._last_columns: dict[str, list[float]] = {}

    # ------------------------------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Wrap the ONE forward to be measured; a failure to start the capture warns once, never raises.

        Compiled graphs do not run module hooks, so a compiled model runs this forward eagerly.
        """
        stack = contextlib.ExitStack()
        try:
            if is_compiled(self.model):
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            self._captures_before = {id(r): r.n_captures for r in self.probe.layers}
            stack.enter_context(self.probe.capture())
            sg = model_shard_group(self.model)
            if sg is None:
                self._sharded = None
            else:
                if self._sharded is None or self._sharded.sg != sg:
                    self._sharded = ShardedProjections(sg)
                stack.enter_context(self._sharded.capture(self._named_layers()))
        except Exception as err:
            stack.close()
            self.guard.fail("capture", err, _rank())
            # measure() still runs (every rank must join the collective): it finds no layer captured
            stack = contextlib.ExitStack()
        with stack:
            yield

    # ------------------------------------------------------------------------------------------ measure
    def _device(self) -> torch.device:
        return next((p.device for p in self.probe.model.parameters()), torch.device("cpu"))

    def _named_layers(self) -> list[tuple[str, LayerRecord]]:
        """``(name, record)`` of the layers still measured (the same on every rank: disabling is agreed)."""
        return [(layer_name(r), r) for r in self.probe.layers if self.guard.active(layer_name(r))]

    def _spectral(self) -> dict[str, Tensor]:
        """All projection norms of all layers in ONE estimator call (a batched power iteration per shape)."""
        if self._sharded is not None:
            # FSDP2: this rank's rows of every matrix; one all-reduce of right vectors per step and shape
            # group. A layer whose rows this rank could not take joins with zero rows (the collectives stay
            # aligned); its failure is agreed at the reduction and its values of this step are dropped.
            names = [name for name, rec in self._named_layers() if rec.has_weights]
            for name, err in self._sharded.errors.items():
                self.guard.fail(name, err, _rank())
            shards = self._sharded.mats(names)
            return self.estimator(shards, all_reduce=self._sharded.all_reduce) if shards else {}
        mats: dict[str, Tensor] = {}
        for rec in self.probe.layers:
            name = layer_name(rec)
            # a layer whose projections were not found (said once at discovery) keeps theta, entropy and
            # B-bar; only G_l, S_l and the bound are missing for it
            if not self.guard.active(name) or not rec.has_weights:
                continue
            w = rec.weights()
            ph = w.per_head()
            mats[f"{name}/q"], mats[f"{name}/k"], mats[f"{name}/v"], mats[f"{name}/o"] = (
                w.w_q,
                w.w_k,
                w.w_v,
                w.w_o,
            )
            mats[f"{name}/qh"], mats[f"{name}/kh"], mats[f"{name}/vh"] = ph["q"], ph["k"], ph["v"]
        return self.estimator(mats) if mats else {}

    def _captured(self, rec: LayerRecord) -> bool:
        """Whether the layer ran (and its kernel was seen) in the measured forward."""
        return rec.theta is not None and rec.n_captures != self._captures_before.get(id(rec), -1)

    def _stats_together(
        self, recs: list[LayerRecord], norms: Mapping[str, Tensor] | None = None
    ) -> dict[int, dict[str, Tensor]]:
        """:meth:`_layer_stats` of the captured layers, by ``id``, for those whose rows share one layout.

        The increments of a group of layers with equal row shapes come from one set of kernels over the
        stacked rows (a few dozen operations for all of them instead of for each); the values are those of
        :meth:`_layer_stats` layer by layer. A group whose stacked computation fails is left out, so that the
        per-layer path attributes the failure to its layer.
        """
        groups: dict[tuple[Any, ...], list[LayerRecord]] = {}
        for rec in recs:
            if not self._captured(rec):
                continue
            assert rec.theta is not None
            optional = (rec.entropy, rec.max_logit, rec.attn_input_max_norm, rec.residual_max_norm)
            layout: tuple[Any, ...] = (tuple(rec.theta.lower.shape), rec.theta.lower.device)
            layout += (rec.theta.lower.dtype, rec.n_nonfinite_rows is None)
            layout += tuple(None if t is None else (tuple(t.shape), t.dtype) for t in optional)
            groups.setdefault(layout, []).append(rec)
        out: dict[int, dict[str, Tensor]] = {}
        for group in groups.values():
            if len(group) < 2:
                continue
            try:
                with torch.no_grad():
                    stacked = self._group_stats(group)
                    self._group_bounds(group, norms or {}, stacked)
            except Exception:
                continue
            for i, rec in enumerate(group):
                out[id(rec)] = {k: v[i] for k, v in stacked.items()}
        return out

    def _group_bounds(
        self, recs: list[LayerRecord], norms: Mapping[str, Tensor], stacked: dict[str, Tensor]
    ) -> None:
        """Add ``proj_norm`` and, where ``stacked`` holds ``theta_head``, ``lipschitz_bound`` (``[K]`` each).

        ``stacked`` holds values of :meth:`_group_stats` (one layer: ``K = 1``). Nothing is added unless every
        layer has its norms and the layers share one head layout.
        """
        from thetascope.functional.sensitivity import mha_lipschitz_bound, projection_norm_product

        names = [layer_name(r) for r in recs]
        if not all(f"{n}/q" in norms for n in names):
            return
        weights = [r.weights() for r in recs]
        layouts = {(w.n_heads, w.n_kv_heads, w.head_dim) for w in weights}
        heads = recs[0].head_index
        if len(layouts) != 1 or any(
            (r.head_index is None) != (heads is None) or (heads is not None and r.head_index is not heads)
            for r in recs
        ):
            return

        def column(field: str) -> Tensor:
            return torch.stack([norms[f"{n}/{field}"] for n in names])  # [K] or [K, heads]

        o = column("o")
        stacked["proj_norm"] = projection_norm_product(column("q"), column("k"), column("v"), o)
        theta_head = stacked.get("theta_head")  # [K, H']
        if theta_head is None:  # the layer did not run in the measured forward: no bound
            return
        n_heads, n_kv, head_dim = layouts.pop()
        rep = n_heads // max(n_kv, 1)
        q_h, k_h, v_h = (
            column("qh"),
            column("kh").repeat_interleave(rep, -1),
            column("vh").repeat_interleave(rep, -1),
        )
        if heads is not None and theta_head.shape[-1] != q_h.shape[-1]:  # only the sampled heads
            heads = heads.to(q_h.device)
            q_h, k_h, v_h = q_h[:, heads], k_h[:, heads], v_h[:, heads]
        stacked["lipschitz_bound"] = mha_lipschitz_bound(
            theta_head,
            stacked["attn_input_max_norm"],
            o,
            q_h,
            k_h,
            v_h,
            head_dim=head_dim,
            tau=self.probe.temperature,
        )

    def _group_stats(self, recs: list[LayerRecord]) -> dict[str, Tensor]:
        """Per-rank increments (and ``theta_head``) of captured layers with one row layout, every value with a
        leading layer dim ``[K]`` (one layer: ``K = 1``, see :meth:`_layer_stats`)."""
        thetas = [r.theta for r in recs]
        assert all(t is not None for t in thetas)
        lower = torch.stack([t.lower for t in thetas if t is not None]).float()  # [K, ...]
        upper = torch.stack([t.upper for t in thetas if t is not None]).float()
        k = lower.shape[0]
        valid = torch.isfinite(lower) & torch.isfinite(upper)
        theta_inc = _theta_update(
            ThetaBounds(lower, upper), THETA_THRESHOLD, DEFAULT_THETA_BINS, stacked=True
        )
        entropies = [r.entropy for r in recs]
        if all(e is not None for e in entropies):
            ent = torch.stack([e for e in entropies if e is not None]).float()
        else:
            ent = torch.full_like(lower, math.nan)
        ent_inc = _entropy_update(torch.where(valid, ent, math.nan), stacked=True)
        out = {f"theta/{f}": v.float() for f, v in theta_inc._asdict().items()}
        out.update({f"entropy/{f}": v.float() for f, v in ent_inc._asdict().items()})
        nan = torch.full((k,), math.nan, device=lower.device)
        for field in ("attn_input_max_norm", "residual_max_norm", "n_nonfinite_rows"):
            values = [getattr(r, field) for r in recs]
            key = "nonfinite_rows" if field == "n_nonfinite_rows" else field
            out[key] = torch.stack([v.reshape(()) for v in values]).float() if values[0] is not None else nan
        if recs[0].max_logit is not None:
            logits = torch.stack([r.max_logit for r in recs if r.max_logit is not None]).float()
            if logits[0].numel():
                flat = logits.reshape(k, -1)
                top = torch.where(torch.isfinite(flat), flat, -math.inf).amax(dim=-1)
                out["max_logit"] = _finite_or_nan(top)
            else:
                out["max_logit"] = nan
        # per-head theta max over (batch, rows): [K, H'] for Thm 5.1
        masked = torch.where(valid, upper, -math.inf)
        out["theta_head"] = _finite_or_nan(
            masked.amax(dim=(1, 3)) if upper.dim() == 4 else masked.reshape(k, -1).amax(dim=-1, keepdim=True)
        )
        return out

    def _layer_stats(self, rec: LayerRecord) -> dict[str, Tensor]:
        """Per-rank increments of one layer (sums, counts, maxima, a histogram), plus ``theta_head`` [H']."""
        together = self._together.pop(id(rec), None)
        if together is not None:  # computed with the other layers of its row layout (_stats_together)
            return together
        if not self._captured(rec):
            # the layer did not run in the measured forward (or its kernel was not seen): a rank that saw
            # nothing adds nothing, and no stale values from an earlier capture
            device = rec.theta.lower.device if rec.theta is not None else self._device()
            none = torch.empty(0, device=device)
            theta_inc = _theta_update(ThetaBounds(none, none), THETA_THRESHOLD, DEFAULT_THETA_BINS)
            ent_inc = _entropy_update(none)
            out = {f"theta/{k}": v for k, v in theta_inc._asdict().items()}
            out.update({f"entropy/{k}": v for k, v in ent_inc._asdict().items()})
            out["nonfinite_rows"] = torch.zeros((), device=device)
            return out
        return {k: v[0] for k, v in self._group_stats([rec]).items()}

    def measure(self) -> dict[str, Tensor]:
        """Per-rank partial values of the forward just captured: device tensors, no host sync.

        Pass them to :meth:`reduce` on every rank (each rank's dict has the same keys and shapes).
        """
        if self._sharded is not None:  # no DTensor reads outside the forward (see weights_from_meta)
            with self._sharded.weights_from_meta(self._named_layers()):
                return self._measure()
        return self._measure()

    def _measure(self) -> dict[str, Tensor]:
        rank = _rank()
        device = self._device()
        nan = torch.tensor(math.nan, device=device)
        out: dict[str, Tensor] = {"tau": torch.tensor(float(self.probe.temperature), device=device)}
        norms: dict[str, Tensor] = {}
        if self.guard.active("spectral"):
            try:
                with torch.no_grad():
                    norms = self._spectral()
            except Exception as err:
                self.guard.fail("spectral", err, rank)
                norms = {}
        out["spectral_failed"] = torch.tensor(float("spectral" in self.guard.failed_now), device=device)
        active = [rec for rec in self.probe.layers if self.guard.active(layer_name(rec))]
        self._together = self._stats_together(active, norms)  # _layer_stats hands them out layer by layer
        for rec in active:  # a layer disabled on every rank alike is skipped: the layouts stay equal
            name = layer_name(rec)
            vals: dict[str, Tensor] = {}
            try:
                with torch.no_grad():
                    vals = self._layer_stats(rec)
                    if "proj_norm" not in vals:  # else computed with its group; here as a group of one
                        one: dict[str, Tensor] = {
                            k: vals[k][None] for k in ("theta_head", "attn_input_max_norm") if k in vals
                        }
                        self._group_bounds([rec], norms, one)
                        vals.update({k: one[k][0] for k in ("proj_norm", "lipschitz_bound") if k in one})
                    vals.pop("theta_head", None)
            except Exception as err:
                self.guard.fail(name, err, rank)
                vals = {}
            failed = name in self.guard.failed_now
            for field in _LAYER_OPS:
                key = f"{name}{_SEP}{field}"
                if field == "failed":
                    out[key] = torch.tensor(float(failed), device=device)
                elif field == "theta/histogram":
                    hist = vals.get(field)
                    out[key] = (
                        hist.float() if hist is not None and not failed else nan.expand(DEFAULT_THETA_BINS)
                    )
                else:
                    value = vals.get(field) if not failed else None
                    out[key] = nan if value is None else value.to(device).float().reshape(())
        self._together = {}
        return out

    # ------------------------------------------------------------------------------------------ reduce
    def reduce(
        self, values: Mapping[str, Tensor], all_gather: AllGather = local_all_gather
    ) -> dict[str, float]:
        """Reduce :meth:`measure`'s values across ranks with ONE collective: full keys to floats, finite only.

        Every rank must call it with the same layout. A failure that happened on any rank disables that
        measurement on every rank.
        """
        packed = PackedValues()
        for key, value in values.items():
            op = _RUN_OPS[key] if key in _RUN_OPS else _LAYER_OPS[key.rsplit(_SEP, 1)[1]]
            packed.add(key, value, op)
        reduced = packed.unpack(reduce_packed(packed, all_gather))
        layers = [r for r in self.probe.layers if f"{layer_name(r)}{_SEP}failed" in reduced]
        agreed = ["spectral"] if float(reduced.get("spectral_failed", 0.0)) > 0 else []
        agreed += [layer_name(r) for r in layers if float(reduced[f"{layer_name(r)}{_SEP}failed"]) > 0]
        self.guard.disable_agreed(agreed)
        try:  # host-side arithmetic after the collective: a failure here needs no agreement
            return self._values(reduced, [r for r in layers if self.guard.active(layer_name(r))])
        except Exception as err:
            self.guard.warn("logging", err, _rank())
            return {}

    def _values(self, reduced: Mapping[str, Tensor], layers: list[LayerRecord]) -> dict[str, float]:
        p = self.prefix
        tau = float(reduced["tau"]) if "tau" in reduced else float(self.probe.temperature)
        # Every layer's increments stacked ([K] per field, [K, bins] histograms): one computation and one
        # host transfer for all layers instead of a few dozen small ops and float() calls per layer.
        names = [layer_name(rec) for rec in layers]
        table: list[dict[str, float]] = []
        columns: dict[str, Tensor] = {}
        if names:

            def stacked(field: str) -> Tensor:
                return torch.stack([reduced[f"{name}{_SEP}{field}"] for name in names])

            inc = ThetaIncrement(**{k: stacked(f"theta/{k}") for k in THETA_INCREMENT_OPS})
            theta = _theta_compute(*inc, quantiles=THETA_QUANTILES)
            entropy = _entropy_compute(*(stacked(f"entropy/{k}") for k in ENTROPY_INCREMENT_OPS))
            columns = {
                "theta_max": theta["max"],
                "theta_max_lower": theta["max_lower"],
                "theta_mean": theta["mean"],
                "theta_frac_099": theta["frac_ge_threshold"],
                "theta_p10": theta["p10"],
                "theta_width": theta["max_width"],
                "entropy": entropy["mean"],
                **{f: stacked(f) for f in _PLAIN_FIELDS},
            }
            values = torch.stack([c.float() for c in columns.values()]).tolist()  # [fields][K]
            table = [
                {**{f: col[i] for f, col in zip(columns, values)}, "sensitivity": math.nan}
                for i in range(len(names))
            ]
        sens_max = math.nan
        if any(math.isfinite(row["proj_norm"]) for row in table):  # no G (spectral norms disabled): no S
            # S_l from the reduced factors of every layer, the stacked columns above
            t, b, g, bad = _sensitivity_update(
                columns["theta_max"].float(),
                columns["attn_input_max_norm"].float(),
                columns["proj_norm"].float(),
                tau,
            )
            sens = _sensitivity_compute(t, b, g, bad)
            for row, s in zip(table, sens["sensitivity"].tolist()):
                row["sensitivity"] = s
            sens_max = float(sens["sensitivity_max"])
        by_layer = {id(rec): row for rec, row in zip(layers, table)}
        self._last_columns = {
            field: [by_layer[id(r)][field] if id(r) in by_layer else math.nan for r in self.probe.layers]
            for field in ("theta_max", "sensitivity")
        }
        out: dict[str, float] = {}
        shown = set(select_layers(self.layers, len(self.probe.layers)))
        for pos, rec in enumerate(self.probe.layers):
            if id(rec) not in by_layer or pos not in shown:
                continue
            for field in ATTENTION_LAYER_FIELDS:
                v = by_layer[id(rec)].get(field, math.nan)
                if math.isfinite(v):  # never NaN the log: missing readings are left out
                    out[layer_key(p, field, rec.index, stack=rec.stack)] = v
        finite_theta = [row["theta_max"] for row in table if math.isfinite(row["theta_max"])]
        if finite_theta:
            out[f"{p}theta_max"] = max(finite_theta)
        if math.isfinite(sens_max):
            out[f"{p}sensitivity_max"] = sens_max
        out[f"{p}{TEMPERATURE_FIELD}"] = tau
        return out

    def headline(self, reduced: Mapping[str, float]) -> dict[str, float]:
        """The headline values of :meth:`reduce`'s result (max theta and max S_l over every layer)."""
        keys = (f"{self.prefix}theta_max", f"{self.prefix}sensitivity_max")
        return {k: float(reduced[k]) for k in keys if k in reduced}

    def heatmap_columns(self, reduced: Mapping[str, float]) -> dict[str, list[float]]:
        """``theta_max`` and ``sensitivity``: one value per layer (NaN where none), for layer x step images.

        Layers whose keys :meth:`reduce` left out (``layers="auto"``) come from the same last reduction.
        """
        cols = {f: list(v) for f, v in self._last_columns.items()}
        for field, col in cols.items():
            for pos, rec in enumerate(self.probe.layers):
                key = layer_key(self.prefix, field, rec.index, stack=rec.stack)
                if key in reduced and pos < len(col):
                    col[pos] = float(reduced[key])
        return cols

    def architecture_card(self) -> dict[str, Any]:
        """Depth, norm placement, path length m, the recommended ``N^(-1/m)`` scale and residual scaling."""
        if self._sharded is not None:  # FSDP2: shapes and W_Q/W_K sharing as read in the measured forward
            with self._sharded.weights_from_meta(self._named_layers()):
                return architecture_card(self.probe)
        return architecture_card(self.probe)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Power-iteration vectors and the probe's capture count (rows resume as in an uninterrupted run)."""
        return {
            "spectral": self.estimator.state_dict(),
            "probe_captures": self.probe.state_dict()["n_captures"],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a missing ``probe_captures`` keeps the probe's count.

        Raises:
            ValueError: the layout is not one :meth:`state_dict` writes (nothing is changed then).
        """
        try:
            captures = state.get("probe_captures")
            captures = None if captures is None else int(captures)
            spectral = state["spectral"]
        except Exception as err:
            raise ValueError(
                f"AttentionMonitor.load_state_dict: unreadable state ({type(err).__name__}: {err})"
            ) from err
        self.estimator.load_state_dict(spectral)
        if captures is not None:
            self.probe.load_state_dict({"n_captures": captures})
