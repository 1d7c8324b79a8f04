"""GradientFlowMonitor: per-layer gradient norms, depth pathology and spike detection."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from thetascope._validation import check_layers_arg, check_positive_int, check_prefix, select_layers
from thetascope.callbacks._lightning import (
    fit_end_diagnosis,
    gather_reduce,
    log_images,
    log_to_loggers,
    publish_callback_metrics,
    refuse_sharded,
    warn_if_state_missing,
    warn_unreadable_state,
)
from thetascope.keys import LOG_MODES, layer_key
from thetascope.monitors._collective import PackedValues
from thetascope.monitors._guard import FailureGuard
from thetascope.report.heatmap import HeatmapHistory

__all__ = ["SPIKE_ACTIONS", "GradientFlowMonitor"]

#: Values accepted by ``GradientFlowMonitor(spike_action=...)``.
SPIKE_ACTIONS: tuple[str, ...] = ("warn", "stop", "none")
_PATHOLOGY_KEYS: tuple[str, ...] = ("early_late_ratio", "log_slope", "vanishing_layers", "min_max_ratio")


class GradientFlowMonitor(Callback):
    """Per-layer gradient norms (unscaled, before clipping), their depth profile, and gradient/loss spikes.

    Every optimizer step, in ``on_before_optimizer_step`` (Lightning calls it after AMP unscaling and before
    gradient clipping), the global gradient norm ``sqrt(sum of squares)`` of the parameters of the optimizer
    being stepped is computed with one ``torch._foreach_norm`` and fed to an on-device robust spike detector
    (:class:`~thetascope.functional.SpikeDetector`); the training loss (from ``on_train_batch_end``) feeds a
    second one. Spike flags accumulate in device counters: nothing is read on the host between measurements.
    On measurement steps the gradients are instead reduced to one norm per layer (and the global norm) with
    :func:`~thetascope.functional.grad_norms_by_group`, again a single ``torch._foreach_norm``.

    On measurement steps (``global_step % every_n_steps == 0``; optimizer steps, never gradient-accumulation
    micro-steps) the per-layer norms, the pathology statistics (early/late ratio, log-slope over depth,
    vanishing layers, min/max ratio), the spike counters and the non-finite count are packed into one vector,
    reduced across ranks with ONE collective, and logged from rank zero at ``step = global_step``.
    ``{prefix}grad_norm_global`` also goes to ``trainer.callback_metrics``.

    Spike reaction (``spike_action``): ``"warn"`` warns, ``"stop"`` sets ``trainer.should_stop`` on every rank
    (the flag is the max over ranks), ``"none"`` only counts. Because the spike flag stays on the device until
    the next measurement step, the reaction comes up to ``every_n_steps - 1`` optimizer steps after the spike
    (choose a smaller ``every_n_steps`` for a faster stop). ``grad/spike`` is 1 when a gradient or loss spike
    happened since the previous measurement; ``grad/spike_count`` and ``loss/spike_count`` are totals since
    the
    start of training (max over ranks for the per-rank loss detector), ``grad/nonfinite`` counts optimizer
    steps
    whose global gradient norm was not finite.

    Under sharded strategies (FSDP, DeepSpeed, ModelParallel) the callback refuses at setup: per-rank norms
    there are norms of shards.

    Args:
        every_n_steps: measure every this many optimizer steps (>= 1).
        spike_action: ``"warn"``, ``"stop"`` or ``"none"``.
        spike_window: history length of the spike detectors (>= 3).
        spike_threshold: robust z-score (median/MAD) above which a value is a spike (> 0).
        vanishing_fraction: a layer "vanishes" when its norm is below this fraction of the largest (0..1).
        layers: per-layer keys to log: ``"all"``/``None``, ``"auto"`` or a list of layer indices.
        prefix: key prefix.
        log_heatmap: log a layer x step heatmap of the per-layer norms to loggers that take images.
        strict: raise on a failed measurement instead of warning once and disabling it.
        log: ``"all"`` logs every key, ``"summary"`` only the headline keys (``theta_max``,
            ``sensitivity_max``, ``grad_norm_global``). Either way the diagnosis at fit end (printed on rank
            zero, kept in ``self.diagnosis``) reads every value.

    Example:
        >>> from thetascope.callbacks import GradientFlowMonitor
        >>> GradientFlowMonitor(every_n_steps=10, spike_action="stop").state_key
        "GradientFlowMonitor{'every_n_steps': 10, 'prefix': 'stability/', 'spike_action': 'stop'}"
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        spike_action: str = "warn",
        spike_window: int = 100,
        spike_threshold: float = 6.0,
        vanishing_fraction: float = 0.01,
        layers: str | list[int] | None = None,
        prefix: str = "stability/",
        log_heatmap: bool = True,
        strict: bool = False,
        log: str = "all",
    ) -> None:
        super().__init__()
        if log not in LOG_MODES:
            raise ValueError(f"log must be one of {LOG_MODES}, got {log!r}")
        self.log_mode = log
        #: The diagnosis of the run, set at fit end on global rank zero (None elsewhere).
        self.diagnosis: Any = None
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        if spike_action not in SPIKE_ACTIONS:
            raise ValueError(f"spike_action must be one of {list(SPIKE_ACTIONS)}, got {spike_action!r}")
        self.spike_action = spike_action
        self.spike_window = check_positive_int("spike_window", spike_window, minimum=3)
        if (
            isinstance(spike_threshold, bool)
            or not isinstance(spike_threshold, (int, float))
            or not math.isfinite(spike_threshold)
            or spike_threshold <= 0
        ):
            raise ValueError(f"spike_threshold must be a finite number > 0, got {spike_threshold!r}")
        self.spike_threshold = float(spike_threshold)
        if (
            isinstance(vanishing_fraction, bool)
            or not isinstance(vanishing_fraction, (int, float))
            or not 0.0 < vanishing_fraction < 1.0
        ):
            raise ValueError(f"vanishing_fraction must be a number in (0, 1), got {vanishing_fraction!r}")
        self.vanishing_fraction = float(vanishing_fraction)
        self.layers = check_layers_arg(layers)
        self.prefix = check_prefix(prefix)
        for name, flag in (("log_heatmap", log_heatmap), ("strict", strict)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.log_heatmap = log_heatmap
        self.strict = strict

        from thetascope.functional.spikes import SpikeDetector

        min_history = min(20, self.spike_window)
        self.grad_detector = SpikeDetector(
            window=self.spike_window, threshold=self.spike_threshold, min_history=min_history
        )
        self.loss_detector = SpikeDetector(
            window=self.spike_window, threshold=self.spike_threshold, min_history=min_history
        )
        self.guard = FailureGuard(type(self).__name__, strict)
        # device counters (created lazily on the gradients' device); host copies only at
        # measurement/checkpoint
        self._grad_spikes_total: Tensor | None = None
        self._grad_spikes_since: Tensor | None = None
        self._loss_spikes_total: Tensor | None = None
        self._loss_spikes_since: Tensor | None = None
        self._nonfinite_total: Tensor | None = None
        self._restored_counts: dict[str, int] = {}
        self._layer_of_param: dict[int, int] = {}
        self._n_layers = 0
        self._opt_groups: dict[int, tuple[list[int], list[list[Tensor]], list[Tensor]]] = {}
        self._last_step = -1
        self._heat = HeatmapHistory(log_scale=True)
        self.last_values: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, prefix=self.prefix, spike_action=self.spike_action
        )

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, type(self).__name__, "gradient")
        from thetascope.functional.gradients import group_parameters_by_layer

        layer_ids, groups, _ = group_parameters_by_layer(pl_module.named_parameters())
        self._layer_of_param = {}
        for layer, params in zip(layer_ids, groups):
            for p in params:
                self._layer_of_param[id(p)] = layer
        self._n_layers = (max(self._layer_of_param.values()) + 1) if self._layer_of_param else 0
        self._opt_groups = {}
        if self._n_layers:
            select_layers(self.layers, self._n_layers)  # a bad layers= is a configuration error: raise it now

    def _groups_for(self, optimizer: Optimizer) -> tuple[list[int], list[list[Tensor]], list[Tensor]]:
        """(layer ids, per-layer params, params outside any layer) of this optimizer, cached per optimizer."""
        key = id(optimizer)
        cached = self._opt_groups.get(key)
        if cached is None:
            by_layer: dict[int, list[Tensor]] = {}
            other: list[Tensor] = []
            for group in optimizer.param_groups:
                for p in group["params"]:
                    layer = self._layer_of_param.get(id(p))
                    if layer is None:
                        other.append(p)
                    else:
                        by_layer.setdefault(layer, []).append(p)
            ids = sorted(by_layer)
            cached = (ids, [by_layer[i] for i in ids], other)
            self._opt_groups[key] = cached
        return cached

    # ------------------------------------------------------------------------------------------------ per
    # step
    def _counter(self, like: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.long, device=like.device)

    def _init_counters(self, like: Tensor) -> None:
        if self._grad_spikes_total is None:
            r = self._restored_counts
            self._grad_spikes_total = self._counter(like) + r.get("grad_spike_count", 0)
            self._loss_spikes_total = self._counter(like) + r.get("loss_spike_count", 0)
            self._nonfinite_total = self._counter(like) + r.get("nonfinite", 0)
            self._grad_spikes_since = self._counter(like) + r.get("grad_spikes_since", 0)
            self._loss_spikes_since = self._counter(like) + r.get("loss_spikes_since", 0)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.diagnosis = fit_end_diagnosis(trainer, self.prefix)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.guard.active("grad_norms"):
            return
        step = trainer.global_step
        measuring = step % self.every_n_steps == 0 and step != self._last_step
        ids, groups, other = self._groups_for(optimizer)
        per_layer: Tensor | None = None
        global_norm: Tensor | None = None
        try:
            if measuring:
                from thetascope.functional.gradients import grad_norms_by_group

                # "other" (embeddings, final norm, head) joins the global norm but gets no per-layer key
                per_layer, global_norm = grad_norms_by_group(groups, other=other)
            else:
                global_norm = _global_grad_norm(self._all_params(optimizer))
                if global_norm is None:
                    return
            self._init_counters(global_norm)
            finite = torch.isfinite(global_norm)
            self._nonfinite_total += (~finite).long()  # type: ignore[operator]
            if self.guard.active("grad_spike"):
                try:
                    spike = self.grad_detector.update(global_norm)
                    self._grad_spikes_since += spike.long()  # type: ignore[operator]
                    self._grad_spikes_total += spike.long()  # type: ignore[operator]
                except Exception as err:
                    self.guard.fail("grad_spike", err, trainer.global_rank)
        except Exception as err:
            self.guard.fail("grad_norms", err, trainer.global_rank)
        if measuring:
            self._last_step = step
            try:
                self.measure(trainer, step, ids, per_layer, global_norm)
            except Exception as err:  # the guarded measurements above keep ranks in step; this is logging
                self.guard.warn("logging", err, trainer.global_rank)

    def _all_params(self, optimizer: Optimizer) -> list[Tensor]:
        _, groups, other = self._groups_for(optimizer)
        return [p for g in groups for p in g] + list(other)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.guard.active("loss_spike"):
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        try:
            loss = loss.detach().float().reshape(())
            self._init_counters(loss)
            spike = self.loss_detector.update(loss)
            self._loss_spikes_since += spike.long()  # type: ignore[operator]
            self._loss_spikes_total += spike.long()  # type: ignore[operator]
        except Exception as err:
            self.guard.fail("loss_spike", err, trainer.global_rank)

    # ------------------------------------------------------------------------------------------------ measure
    def measure(
        self,
        trainer: pl.Trainer,
        step: int,
        layer_ids: list[int],
        per_layer: Tensor | None,
        global_norm: Tensor | None,
    ) -> dict[str, float]:
        """Pack, reduce (ONE collective), react to spikes and log. Every rank calls it at the same steps."""
        from thetascope.functional.gradients import gradient_pathology

        rank = trainer.global_rank
        device = global_norm.device if global_norm is not None else trainer.strategy.root_device
        nan = torch.tensor(math.nan, device=device)
        n = len(layer_ids)
        packed = PackedValues()
        if per_layer is None or global_norm is None:
            per_layer, global_norm = torch.full((n,), math.nan, device=device), nan
            ok = False
        else:
            ok = True
        # Gradients are identical on every DDP rank after the backward's all-reduce, so "mean" is exact.
        packed.add("grad_norm", per_layer, "mean")
        packed.add("global", global_norm, "mean")
        patho: dict[str, Tensor] = {}
        if ok and n > 0 and self.guard.active("pathology"):
            try:
                patho = gradient_pathology(per_layer, vanishing_fraction=self.vanishing_fraction)
            except Exception as err:
                self.guard.fail("pathology", err, rank)
        for key in _PATHOLOGY_KEYS:
            packed.add(key, patho.get(key, nan), "mean")
        zero = torch.zeros((), device=device)
        since = zero
        if self._grad_spikes_since is not None:
            since = (self._grad_spikes_since + self._loss_spikes_since).float()  # type: ignore[operator]
        packed.add("spike", (since > 0).float(), "max")
        packed.add(
            "grad_spike_count",
            self._grad_spikes_total if self._grad_spikes_total is not None else zero,
            "max",
        )
        packed.add(
            "loss_spike_count",
            self._loss_spikes_total if self._loss_spikes_total is not None else zero,
            "max",
        )
        packed.add("nonfinite", self._nonfinite_total if self._nonfinite_total is not None else zero, "max")
        for name in ("grad_norms", "grad_spike", "loss_spike", "pathology"):
            packed.add(f"failed/{name}", float(name in self.guard.failed_now), "max")

        reduced = packed.unpack(gather_reduce(trainer, packed, device))
        self.guard.disable_agreed(
            [
                n_
                for n_ in ("grad_norms", "grad_spike", "loss_spike", "pathology")
                if float(reduced[f"failed/{n_}"]) > 0
            ]
        )
        if self._grad_spikes_since is not None:
            self._grad_spikes_since.zero_()
            self._loss_spikes_since.zero_()  # type: ignore[union-attr]

        p = self.prefix
        metrics: dict[str, float] = {}
        layer_norms = reduced["grad_norm"].tolist()
        shown = set(select_layers(self.layers, self._n_layers)) if self._n_layers else set()
        for lid, v in zip(layer_ids, layer_norms):
            if lid in shown and math.isfinite(v):
                metrics[layer_key(p, "grad_norm", lid)] = v
        glob = float(reduced["global"])
        if math.isfinite(glob):
            metrics[f"{p}grad_norm/global"] = glob
            metrics[f"{p}grad_norm_global"] = glob
        for key in _PATHOLOGY_KEYS:
            v = float(reduced[key])
            if math.isfinite(v):
                metrics[f"{p}grad/{key}"] = v
        spike = float(reduced["spike"]) > 0
        metrics[f"{p}grad/spike"] = float(spike)
        metrics[f"{p}grad/spike_count"] = float(reduced["grad_spike_count"])
        metrics[f"{p}loss/spike_count"] = float(reduced["loss_spike_count"])
        metrics[f"{p}grad/nonfinite"] = float(reduced["nonfinite"])

        log_to_loggers(trainer, metrics, step, self.log_mode, self.prefix)
        if math.isfinite(glob):
            publish_callback_metrics(trainer, {f"{p}grad_norm_global": glob})
        if spike and self.spike_action == "warn":
            rank_zero_warn(
                f"GradientFlowMonitor: gradient-norm or loss spike detected between optimizer steps "
                f"{max(step - self.every_n_steps + 1, 0)} and {step} (global grad norm now {glob:.4g})."
            )
        elif spike and self.spike_action == "stop":
            rank_zero_warn(
                f"GradientFlowMonitor: spike detected by step {step}; "
                "stopping training (spike_action='stop')."
            )
            trainer.should_stop = True
        if self.log_heatmap and n > 0 and trainer.is_global_zero and trainer.loggers:
            full = [math.nan] * self._n_layers
            for lid, v in zip(layer_ids, layer_norms):
                full[lid] = v
            self._heat.append(step, full)
            log_images(trainer, {f"{p}grad_norm/heatmap": self._heat.image()}, step)
        self.last_values = metrics
        return metrics

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        def host(t: Tensor | None, key: str) -> int:
            return int(t) if t is not None else int(self._restored_counts.get(key, 0))

        return {
            "grad_detector": self.grad_detector.state_dict(),
            "loss_detector": self.loss_detector.state_dict(),
            "grad_spike_count": host(self._grad_spikes_total, "grad_spike_count"),
            "loss_spike_count": host(self._loss_spikes_total, "loss_spike_count"),
            "nonfinite": host(self._nonfinite_total, "nonfinite"),
            "grad_spikes_since": host(self._grad_spikes_since, "grad_spikes_since"),
            "loss_spikes_since": host(self._loss_spikes_since, "loss_spikes_since"),
            "last_step": self._last_step,
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        warn_if_state_missing(self, checkpoint)

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            self._load_state_dict(state_dict)
        except Exception as err:  # an older or foreign layout: start fresh rather than stop the run
            warn_unreadable_state(type(self).__name__, err)
            from thetascope.functional.spikes import SpikeDetector

            min_history = min(20, self.spike_window)
            self.grad_detector = SpikeDetector(self.spike_window, self.spike_threshold, min_history)
            self.loss_detector = SpikeDetector(self.spike_window, self.spike_threshold, min_history)
            self._restored_counts = {}
            self._grad_spikes_total = self._loss_spikes_total = self._nonfinite_total = None
            self._grad_spikes_since = self._loss_spikes_since = None
            self._last_step = -1

    def _load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.grad_detector.load_state_dict(state_dict["grad_detector"])
        self.loss_detector.load_state_dict(state_dict["loss_detector"])
        self._restored_counts = {
            k: int(state_dict.get(k, 0))
            for k in (
                "grad_spike_count",
                "loss_spike_count",
                "nonfinite",
                "grad_spikes_since",
                "loss_spikes_since",
            )
        }
        self._grad_spikes_total = self._loss_spikes_total = self._nonfinite_total = None
        self._grad_spikes_since = self._loss_spikes_since = None
        self._last_step = int(state_dict.get("last_step", -1))


def _global_grad_norm(params: list[Tensor]) -> Tensor | None:
    """``sqrt(sum of squares)`` of all gradients with ONE ``torch._foreach_norm`` and no host-to-device copy.

    The per-step path (spike detection): unlike the grouped norms of the measurement steps, it needs no group
    index tensor, whose creation from a Python list would be a synchronous host-to-device copy on CUDA.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    # float64 gradients (a model cast with .double()) need a float64 reduction (no narrowing dtype=)
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    norms: Sequence[Tensor]
    try:
        norms = torch._foreach_norm(grads, 2, dtype=dtype)
    except (TypeError, RuntimeError):  # older torch without dtype=
        norms = [torch.linalg.vector_norm(g, dtype=dtype) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)).float()
