"""GradientFlowMonitor: per-layer gradient norms, depth pathology and spike detection (Lightning wiring)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from thetascope import keys
from thetascope._validation import check_bool, check_choice
from thetascope.callbacks._lightning import (
    DiagnosedCallback,
    log_images,
    log_to_loggers,
    publish_callback_metrics,
    refuse_sharded,
    trainer_all_gather,
    warn_unreadable_state,
)
from thetascope.functional.spikes import SpikeDetector
from thetascope.monitors._guard import FailureGuard
from thetascope.monitors.gradient import GradientFlowCore
from thetascope.report.heatmap import HeatmapHistory

__all__ = ["SPIKE_ACTIONS", "GradientFlowMonitor"]

#: Values accepted by ``GradientFlowMonitor(spike_action=...)``.
SPIKE_ACTIONS: tuple[str, ...] = ("warn", "stop", "none")


class GradientFlowMonitor(DiagnosedCallback):
    """Per-layer gradient norms (unscaled, before clipping), their depth profile, and gradient/loss spikes.

    On measurement steps (``global_step % every_n_steps == 0``: optimizer steps, never gradient-accumulation
    micro-steps) it logs, from rank zero at ``step = global_step``, the keys of
    :class:`~thetascope.monitors.GradientFlowCore`: ``{prefix}grad_norm/layer_XX`` (with the stack,
    ``.../encoder/layer_XX``, for encoder-decoder models), ``{prefix}grad_norm/global`` (also put into
    ``trainer.callback_metrics`` as ``{prefix}grad_norm_global``), the depth profile ``{prefix}grad/...``
    (early/late ratio, log-slope over depth, vanishing layers, min/max ratio), ``{prefix}grad/spike`` (1
    when a gradient or loss spike happened since the previous measurement), ``{prefix}grad/spike_count`` and
    ``{prefix}loss/spike_count`` (totals since the start; the loss count is the max over ranks) and
    ``{prefix}grad/nonfinite`` (optimizer steps whose global gradient norm was not finite); plus a layer x
    step heatmap ``{prefix}grad_norm/heatmap`` for loggers that take images.

    Spike reaction (``spike_action``): ``"warn"`` warns, ``"stop"`` sets ``trainer.should_stop`` on every
    rank, ``"none"`` only counts. Spikes are detected at every optimizer step but read at the next
    measurement, so the reaction comes up to ``every_n_steps - 1`` optimizer steps late (choose a smaller
    ``every_n_steps`` for a faster stop). Under sharded strategies (FSDP, DeepSpeed, ModelParallel) the
    callback refuses at setup.

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
        prefix: str = keys.DEFAULT_PREFIX,
        log_heatmap: bool = True,
        strict: bool = False,
        log: str = "all",
    ) -> None:
        super().__init__()
        self._init_schedule(every_n_steps, log)
        self.spike_action = check_choice("spike_action", spike_action, list(SPIKE_ACTIONS))
        self.log_heatmap = check_bool("log_heatmap", log_heatmap)
        self.core = GradientFlowCore(
            None,
            spike_window=spike_window,
            spike_threshold=spike_threshold,
            vanishing_fraction=vanishing_fraction,
            layers=layers,
            prefix=prefix,
            strict=strict,
        )
        self.core.guard.owner = type(self).__name__
        c = self.core  # the validated settings, readable as before
        self.spike_window, self.spike_threshold, self.vanishing_fraction = (
            c.spike_window,
            c.spike_threshold,
            c.vanishing_fraction,
        )
        self.layers, self.prefix, self.strict = c.layers, c.prefix, c.strict
        self._last_step = -1
        self._heat = HeatmapHistory(log_scale=True)
        self.last_values: dict[str, float] = {}

    @property
    def grad_detector(self) -> SpikeDetector:
        """The gradient-norm spike detector (the core's)."""
        return self.core.grad_detector

    @property
    def loss_detector(self) -> SpikeDetector:
        """The loss spike detector (the core's)."""
        return self.core.loss_detector

    @property
    def guard(self) -> FailureGuard:
        """Which measurements failed and are disabled (the core's)."""
        return self.core.guard

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, prefix=self.prefix, spike_action=self.spike_action
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, type(self).__name__, "gradient", fsdp2=True)
        self.core.rank = trainer.global_rank
        self.core.bind(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # configure_model (FSDP2's fully_shard) runs after setup and replaces every parameter by a DTensor
        self.core.bind(pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # Lightning calls this hook after AMP unscaling and before gradient clipping
        if not self.guard.active("grad_norms"):
            return
        step = trainer.global_step
        self.core.observe_step(optimizer)
        if step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.measure(trainer, step, self.core.measure(optimizer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self.core.observe_loss(loss)

    def measure(self, trainer: pl.Trainer, step: int, values: Mapping[str, Tensor]) -> dict[str, float]:
        """Reduce (ONE collective), log and react to spikes. Every rank calls it at the same steps."""
        metrics: dict[str, float] = {}
        try:
            metrics = self.core.reduce(values, trainer_all_gather(trainer))
            self._log(trainer, step, metrics)
        except Exception as err:  # the collective is behind us: host arithmetic or logging failed here
            self.guard.warn("logging", err, trainer.global_rank)
        self.last_values = metrics
        return metrics

    def _log(self, trainer: pl.Trainer, step: int, metrics: dict[str, float]) -> None:
        p = self.prefix
        log_to_loggers(trainer, metrics, step, self.log_mode, self.prefix)
        glob = metrics.get(p + keys.GRAD_NORM_HEADLINE, math.nan)
        if math.isfinite(glob):
            publish_callback_metrics(trainer, {p + keys.GRAD_NORM_HEADLINE: glob})
        if self.core.spike_detected and self.spike_action == "warn":
            rank_zero_warn(
                f"GradientFlowMonitor: gradient-norm or loss spike detected between optimizer steps "
                f"{max(step - self.every_n_steps + 1, 0)} and {step} (global grad norm now {glob:.4g})."
            )
        elif self.core.spike_detected and self.spike_action == "stop":
            rank_zero_warn(
                f"GradientFlowMonitor: spike detected by step {step}; "
                "stopping training (spike_action='stop')."
            )
            trainer.should_stop = True
        if self.log_heatmap and self.core.blocks and trainer.is_global_zero and trainer.loggers:
            self._heat.append(step, self.core.layer_norms)
            log_images(trainer, {p + keys.GRAD_NORM_HEATMAP: self._heat.image()}, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.core.state_dict()
        # totals for readers of the checkpoint; the detectors hold the counts themselves
        state["grad_spike_count"] = state["grad_detector"]["n_spikes"]
        state["loss_spike_count"] = state["loss_detector"]["n_spikes"]
        state["nonfinite"] = state["grad_detector"]["n_nonfinite"]
        state["last_step"] = self._last_step
        return state

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            last = int(state_dict.get("last_step", -1))
            self.core.load_state_dict(state_dict)
        except Exception as err:  # an older or foreign layout: start fresh rather than stop the run
            warn_unreadable_state(type(self).__name__, err)
            self.core.reset()
            self._last_step = -1
            return
        self._last_step = last
