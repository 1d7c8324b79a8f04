"""GradientFlowCore: per-layer gradient norms, their depth profile and gradient/loss spikes; no Lightning."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from thetascope import keys
from thetascope._validation import (
    check_bool,
    check_layers_arg,
    check_open_fraction,
    check_positive_float,
    check_positive_int,
    check_prefix,
    select_layers,
)
from thetascope.functional.spikes import SpikeDetector
from thetascope.monitors._collective import AllGather, PackedValues, local_all_gather, reduce_packed
from thetascope.monitors._guard import FailureGuard

__all__ = ["MEASUREMENTS", "GradientFlowCore"]

#: Measurements a failure can disable, each on every rank alike (see :class:`FailureGuard`).
MEASUREMENTS: tuple[str, ...] = ("grad_norms", "grad_spike", "loss_spike", "pathology")
# (layer positions, their params, params outside any layer, all params, whether they are FSDP2 shards)
_Groups = tuple[list[int], list[list[Tensor]], list[Tensor], list[Tensor], bool]

Block = tuple[str | None, int]  # (stack or None, layer index)


class GradientFlowCore:
    """Gradient norms per layer (and globally), their depth pathology, gradient/loss spikes: no Lightning.

    Call :meth:`observe_step` at every optimizer step after unscaling and before clipping, and
    :meth:`observe_loss` with every training loss: each costs one fused norm or one detector update on the
    device, with no host sync. On measurement steps, :meth:`measure` then :meth:`reduce` give these floats
    (``p`` is ``prefix``; keys from :mod:`thetascope.keys`):

    * ``{p}grad_norm/layer_XX``: gradient norm of each layer's parameters (``{p}grad_norm/{stack}/layer_XX``
      for encoder-decoder models, ``stack`` being ``encoder`` or ``decoder``), for the layers chosen by
      ``layers``; ``{p}grad_norm/global`` and ``{p}grad_norm_global``: the norm of all stepped parameters.
    * ``{p}grad/early_late_ratio``, ``log_slope``, ``vanishing_layers``, ``min_max_ratio``: the depth profile
      (:func:`~thetascope.functional.gradient_pathology`) over all layers, encoder first.
    * ``{p}grad/spike`` (1 when a gradient-norm or loss spike happened since the previous measurement, on any
      rank), ``{p}grad/spike_count`` and ``{p}loss/spike_count`` (totals since the start), and
      ``{p}grad/nonfinite`` (optimizer steps whose global norm was not finite).

    Non-finite values are left out. After :meth:`reduce`, :attr:`spike_detected` says whether to react.

    Args:
        model: the model whose parameters are grouped by layer (``None``: call :meth:`bind` before use).
        spike_window: history length of the spike detectors (>= 3).
        spike_threshold: robust z-score (median/MAD) above which a value is a spike (> 0).
        vanishing_fraction: a layer "vanishes" when its norm is below this fraction of the largest (0..1).
        layers: per-layer keys to report: ``"all"``/``None``, ``"auto"`` or a list of layer indices.
        prefix: key prefix.
        strict: raise on a failed measurement instead of warning once and disabling it.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> core = GradientFlowCore(model)
        >>> model(torch.ones(2, 4)).sum().backward()
        >>> core.observe_step()
        >>> logged = core.reduce(core.measure())
        >>> sorted(logged)[:2], core.spike_detected
        (['stability/grad/nonfinite', 'stability/grad/spike'], False)
    """

    #: Gradients are replicated on every rank (DDP): per-rank sums of squares are averaged. Set to False when
    #: each rank holds a shard of the gradients, so that the sums of squares are added instead.
    replicated: bool = True

    def __init__(
        self,
        model: nn.Module | None,
        *,
        spike_window: int = 100,
        spike_threshold: float = 6.0,
        vanishing_fraction: float = 0.01,
        layers: str | list[int] | None = None,
        prefix: str = keys.DEFAULT_PREFIX,
        strict: bool = False,
    ) -> None:
        self.spike_window = check_positive_int("spike_window", spike_window, minimum=3)
        self.spike_threshold = check_positive_float("spike_threshold", spike_threshold)
        self.vanishing_fraction = check_open_fraction("vanishing_fraction", vanishing_fraction)
        self.layers = check_layers_arg(layers)
        self.prefix = check_prefix(prefix)
        self.strict = check_bool("strict", strict)
        self.guard = FailureGuard(type(self).__name__, self.strict)
        self.rank = _default_rank()
        self.grad_detector, self.loss_detector = self._new_detector(), self._new_detector()
        # n_spikes of each detector at the previous measurement: "since" counts are differences from it
        self._grad_mark = 0
        self._loss_mark = 0
        self.spike_detected = False
        #: Norm of every layer (NaN where the measured optimizer has none), set by :meth:`reduce`.
        self.layer_norms: list[float] = []
        self.blocks: list[Block] = []
        self._position: dict[int, int] = {}
        self._shown: set[int] = set()
        self._cache: dict[int | None, _Groups] = {}
        self._model: nn.Module | None = None
        if model is not None:
            self.bind(model)

    def _new_detector(self) -> SpikeDetector:
        return SpikeDetector(self.spike_window, self.spike_threshold, min(20, self.spike_window))

    # ------------------------------------------------------------------------------------------- layout
    def bind(self, model: nn.Module) -> None:
        """Group ``model``'s parameters by layer (again, after the model changed); keeps the spike state.

        Raises:
            ValueError: ``layers`` names a layer the model does not have.
        """
        from thetascope.functional.gradients import group_parameters_by_block

        blocks, groups, _ = group_parameters_by_block(model.named_parameters())
        self._model = model
        self.blocks = blocks
        self._position = {id(p): pos for pos, params in enumerate(groups) for p in params}
        self._cache = {}
        sizes: dict[str | None, int] = {}
        for stack, index in blocks:
            sizes[stack] = max(sizes.get(stack, 0), index + 1)
        self._shown = set()
        if blocks:
            select_layers(self.layers, max(sizes.values()))  # a bad layers= is a configuration error
            chosen = {s: set(select_layers(self._per_stack(n), n)) for s, n in sizes.items()}
            self._shown = {pos for pos, (stack, index) in enumerate(blocks) if index in chosen[stack]}

    def _per_stack(self, n: int) -> str | list[int]:
        return self.layers if isinstance(self.layers, str) else [i for i in self.layers if i < n]

    def _groups(self, optimizer: Optimizer | None) -> _Groups:
        """The parameters of ``optimizer`` by layer (see ``_Groups``), cached: steps never walk them again."""
        key = None if optimizer is None else id(optimizer)
        cached = self._cache.get(key)
        if cached is None:
            if optimizer is None:
                if self._model is None:
                    raise RuntimeError("GradientFlowCore: pass an optimizer or bind(model) first")
                params = [p for p in self._model.parameters() if p.requires_grad]
            else:
                params = [p for group in optimizer.param_groups for p in group["params"]]
            by_pos: dict[int, list[Tensor]] = {}
            other: list[Tensor] = []
            seen: set[int] = set()
            for p in params:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                pos = self._position.get(id(p))
                if pos is None:
                    other.append(p)
                else:
                    by_pos.setdefault(pos, []).append(p)
            ids = sorted(by_pos)
            groups = [by_pos[i] for i in ids]
            flat = [p for g in groups for p in g] + other
            cached = (ids, groups, other, flat, _sharded(flat))
            self._cache[key] = cached
        return cached

    # ------------------------------------------------------------------------------------------- per step
    def observe_step(self, optimizer: Optimizer | None = None) -> None:
        """Feed the global gradient norm to the gradient spike detector; no host sync.

        Call it at every optimizer step, after unscaling and before clipping. The norm is over the parameters
        of ``optimizer`` (of the model for ``None``), from one fused ``torch._foreach_norm``.
        """
        if not self.guard.active("grad_norms"):
            return
        from thetascope.functional.gradients import global_grad_norm

        try:
            _, _, _, params, sharded = self._groups(optimizer)
            norm = _sharded_global_norm(params) if sharded else global_grad_norm(params)
        except Exception as err:
            self.guard.fail("grad_norms", err, self.rank)
            return
        if norm is None or not self.guard.active("grad_spike"):
            return
        try:
            self.grad_detector.push(norm)
        except Exception as err:
            self.guard.fail("grad_spike", err, self.rank)

    def observe_loss(self, loss: Tensor) -> None:
        """Feed a training loss (a one-element tensor) to the loss spike detector; no host sync."""
        if not self.guard.active("loss_spike") or not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        try:
            self.loss_detector.push(loss.detach().reshape(()))
        except Exception as err:
            self.guard.fail("loss_spike", err, self.rank)

    # ------------------------------------------------------------------------------------------- measure
    def measure(self, optimizer: Optimizer | None = None) -> dict[str, Tensor]:
        """This rank's partial values at a measurement step: device tensors, no host sync.

        ``grad_sq`` ``[L]`` (per-layer sums of squared gradient entries, NaN for layers this optimizer does
        not step) and ``global_sq`` ``[]`` are sums of squares, so ranks holding shards can add them;
        ``present`` ``[L]`` marks the stepped layers; then the spike counters and the failure flags.
        """
        from thetascope.functional.gradients import grad_sq_norms_by_group

        ids, groups, other, params, sharded = self._groups(optimizer)
        n = len(self.blocks)
        device = next((p.grad.device for p in params if p.grad is not None), None)
        if device is None:
            device = self.grad_detector.device
        nan = torch.tensor(math.nan, device=device)
        grad_sq, global_sq = torch.full((n,), math.nan, device=device), nan
        if self.guard.active("grad_norms"):
            try:
                if sharded:
                    # FSDP2: sums of squares of the local shards, weighted so that the sum over all ranks
                    # (the reduction below, with op "sum") counts every full parameter once
                    per_sq, global_sq = _sharded_sq_norms(groups, other)
                    self.replicated = False
                else:
                    per_sq, global_sq, _ = grad_sq_norms_by_group(groups, other=other)
                if ids:
                    grad_sq = grad_sq.index_copy(0, torch.tensor(ids, device=device), per_sq.to(device))
            except Exception as err:
                self.guard.fail("grad_norms", err, self.rank)
                grad_sq, global_sq = torch.full((n,), math.nan, device=device), nan
        present = torch.zeros(n, device=device)
        present[ids] = 1.0
        try:  # reading the counters judges the values pushed since the last refresh (see SpikeDetector.push)
            g_spikes, g_nonfinite = self.grad_detector.n_spikes.to(device), self.grad_detector.n_nonfinite
            lo_spikes = self.loss_detector.n_spikes.to(device)
        except Exception as err:
            self.guard.fail("grad_spike", err, self.rank)
            g_spikes, lo_spikes = torch.tensor(self._grad_mark, device=device), torch.tensor(self._loss_mark)
            g_nonfinite = torch.tensor(math.nan)
        since = (g_spikes - self._grad_mark) + (lo_spikes.to(device) - self._loss_mark)
        return {
            "grad_sq": grad_sq,
            "global_sq": global_sq.reshape(()),
            "present": present,
            "spike": (since > 0).float(),
            "grad_spike_count": g_spikes.float(),
            "loss_spike_count": lo_spikes.to(device).float(),
            "nonfinite": g_nonfinite.to(device).float(),
            "failed": torch.tensor([float(m in self.guard.failed_now) for m in MEASUREMENTS], device=device),
        }

    def reduce(
        self, values: Mapping[str, Tensor], all_gather: AllGather = local_all_gather
    ) -> dict[str, float]:
        """Reduce :meth:`measure`'s values across ranks with ONE collective; the floats to log, by full key.

        Every rank must call it at the same steps. It syncs the host (measurement steps only).
        """
        op = "mean" if self.replicated else "sum"
        packed = PackedValues()
        packed.add("grad_sq", values["grad_sq"], op)
        packed.add("global_sq", values["global_sq"], op)
        for name in ("present", "spike", "grad_spike_count", "loss_spike_count", "nonfinite", "failed"):
            packed.add(name, values[name], "max")
        reduced = packed.unpack(reduce_packed(packed, all_gather))
        failed = reduced["failed"].tolist()
        self.guard.disable_agreed([m for m, f in zip(MEASUREMENTS, failed) if f > 0])
        # this rank's counts at the measurement: the next "since" starts from them
        self._grad_mark = int(values["grad_spike_count"])
        self._loss_mark = int(values["loss_spike_count"])

        p = self.prefix
        norms = reduced["grad_sq"].sqrt()
        present = reduced["present"] > 0
        self.layer_norms = [v if ok else math.nan for v, ok in zip(norms.tolist(), present.tolist())]
        out: dict[str, float] = {}
        for pos, ((stack, index), v) in enumerate(zip(self.blocks, self.layer_norms)):
            if pos in self._shown and math.isfinite(v):
                out[keys.layer_key(p, "grad_norm", index, stack=stack)] = v
        glob = math.sqrt(float(reduced["global_sq"])) if float(reduced["global_sq"]) >= 0 else math.nan
        if math.isfinite(glob):
            out[p + keys.GRAD_NORM_GLOBAL] = glob
            out[p + keys.GRAD_NORM_HEADLINE] = glob
        if bool(present.any()) and self.guard.active("pathology"):
            # from the reduced norms, so sharded ranks get the profile of the full gradients
            from thetascope.functional import gradients as functional_gradients

            try:
                stats = functional_gradients.gradient_pathology(
                    norms[present], vanishing_fraction=self.vanishing_fraction
                )
                for field in keys.PATHOLOGY_FIELDS:
                    v = float(stats[field])
                    if math.isfinite(v):
                        out[p + keys.PATHOLOGY_GROUP + field] = v
            except Exception as err:  # agreed across ranks at the next measurement (no collective here)
                self.guard.fail("pathology", err, self.rank)
        self.spike_detected = float(reduced["spike"]) > 0
        out[p + keys.GRAD_SPIKE] = float(self.spike_detected)
        out[p + keys.GRAD_SPIKE_COUNT] = float(reduced["grad_spike_count"])
        out[p + keys.LOSS_SPIKE_COUNT] = float(reduced["loss_spike_count"])
        if math.isfinite(float(reduced["nonfinite"])):  # NaN: the detector could not be read (warned)
            out[p + keys.GRAD_NONFINITE] = float(reduced["nonfinite"])
        return out

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain data: both detectors (buffers, counters) and the spike counts since the last measurement."""
        grad, loss = self.grad_detector.state_dict(), self.loss_detector.state_dict()
        return {
            "grad_detector": grad,
            "loss_detector": loss,
            "grad_spikes_since": grad["n_spikes"] - self._grad_mark,
            "loss_spikes_since": loss["n_spikes"] - self._loss_mark,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; validated as a whole, so a bad layout leaves this core as it was.

        Raises:
            ValueError, KeyError, TypeError: the layout is not one :meth:`state_dict` writes.
        """
        for name in ("grad_detector", "loss_detector"):  # validate both before changing either
            self._new_detector().load_state_dict(state[name])
        grad_since, loss_since = (
            int(state.get("grad_spikes_since", 0)),
            int(state.get("loss_spikes_since", 0)),
        )
        self.grad_detector.load_state_dict(state["grad_detector"])
        self.loss_detector.load_state_dict(state["loss_detector"])
        self._grad_mark = int(self.grad_detector.n_spikes) - grad_since
        self._loss_mark = int(self.loss_detector.n_spikes) - loss_since

    def reset(self) -> None:
        """Fresh detectors and counters (after an unreadable checkpoint)."""
        self.grad_detector, self.loss_detector = self._new_detector(), self._new_detector()
        self._grad_mark = self._loss_mark = 0


def _sharded(params: list[Tensor]) -> bool:
    """Whether ``params`` are FSDP2 / DTensor parameters (their gradients are shards)."""
    from thetascope.functional.sharding import is_dtensor

    return any(is_dtensor(p) for p in params)


def _sharded_sq_norms(groups: list[list[Tensor]], other: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(per-layer [L], total [])`` of this rank's world-weighted local sums of squares; no collective."""
    import torch.distributed as dist

    from thetascope.functional.sharding import local_sums_of_squares

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    grads = [[p.grad.detach() for p in g if p.grad is not None] for g in [*groups, other]]
    sq = local_sums_of_squares(grads, world=world)
    return sq[:-1], sq.sum()


def _sharded_global_norm(params: list[Tensor]) -> Tensor | None:
    """The full gradients' global norm, the same on every rank: ONE scalar all-reduce over the shard group.

    The only per-step collective of the monitors, and only under FSDP2: it makes the spike detector see the
    norm of the full gradient (as under DDP), so every rank flags the same spikes and stops at the same step.
    """
    from thetascope.functional.sharding import local_sums_of_squares, shard_all_reduce, shard_group

    sg = shard_group(params)
    failure: Exception | None = None
    grads: list[Tensor] = []
    try:
        grads = [p.grad.detach() for p in params if p.grad is not None]
        local = local_sums_of_squares([grads], sg)
    except Exception as err:  # still join the all-reduce: a rank that skipped it would hang the others
        failure, local = err, torch.full((1,), math.nan)
    total = shard_all_reduce(sg)(local)
    if failure is not None:
        raise failure
    return total[0].sqrt() if grads else None


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
