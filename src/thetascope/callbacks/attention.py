"""AttentionSensitivityMonitor: the Lightning wiring of the attention monitor core (monitors/attention)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from thetascope._validation import check_bool
from thetascope.callbacks._lightning import (
    DiagnosedCallback,
    gather_host_ints,
    log_images,
    log_to_loggers,
    publish_callback_metrics,
    refuse_sharded,
    trainer_all_gather,
    warn_unreadable_state,
)
from thetascope.capture.registry import shared_probe
from thetascope.functional.spectral import SpectralNormEstimator
from thetascope.keys import CARD_PREFIX, TEMPERATURE_FIELD
from thetascope.monitors._guard import FailureGuard
from thetascope.monitors.attention import AttentionMonitor, AttentionSettings
from thetascope.report.heatmap import HeatmapHistory

if TYPE_CHECKING:
    from thetascope.capture.probe import AttentionProbe

__all__ = ["AttentionSensitivityMonitor"]


class AttentionSensitivityMonitor(AttentionSettings, DiagnosedCallback):
    """Measure the attention of the current training batch every ``every_n_steps`` optimizer steps.

    On a measurement step (``global_step % every_n_steps == 0``, counted in optimizer steps, so never on a
    gradient-accumulation micro-step; the first micro-batch of that step is observed) the training forward is
    captured and, right after it, every attention layer is measured: the keys, fields and their meaning are
    those of :class:`~thetascope.monitors.attention.AttentionMonitor` (theta bracket statistics, entropy,
    both B-bar readings, ``G_l``, ``S_l``, the Theorem 5.1 bound, per layer as ``{prefix}{field}/layer_XX``).
    On every other step no hook is installed and nothing is added.

    The values are reduced across ranks with ONE collective and logged from rank zero at ``step =
    global_step``. ``{prefix}theta_max`` and ``{prefix}sensitivity_max`` (max over layers) also go to
    ``trainer.callback_metrics`` for ``EarlyStopping``/``ModelCheckpoint``; ``{prefix}temperature`` is
    logged unless a :class:`TemperatureWarmup` with the same prefix logs it. Loggers that take images get
    layer x step heatmaps of theta_max and S_l. An architecture card (depth N, norm placement, path length m,
    the ``N^(-1/m)`` scale, residual scaling if detectable) is logged as hyperparameters ``{prefix}card/...``
    at the first measurement.

    Args:
        every_n_steps: measure every this many optimizer steps (>= 1).
        rows_per_head: query rows sampled per (batch item, head).
        exact_top: entries enumerated exactly by the theta bracket (1..20).
        layers: which layers' per-layer keys to log: ``"all"``/``None``, ``"auto"`` (first, second, middle,
            second-last, last) or a list of layer indices. Headline maxima always cover every layer.
        batch_size: measure only the first ``batch_size`` items of the batch (``None`` = all).
        power_iters: power-iteration steps per measurement (``None`` = the estimator's default).
        prefix: key prefix.
        prog_bar: also show the headline values in the progress bar.
        log_heatmap: log layer x step heatmaps of theta_max and sensitivity to loggers that take images.
        strict: raise on a failed measurement instead of warning once and disabling it.
        log: ``"all"`` logs every key, ``"summary"`` only the headline keys (``theta_max``,
            ``sensitivity_max``, ``grad_norm_global``). Either way the diagnosis at fit end (printed on rank
            zero, kept in ``self.diagnosis``) reads every value.

    Example:
        >>> from thetascope.callbacks import AttentionSensitivityMonitor
        >>> cb = AttentionSensitivityMonitor(every_n_steps=100, layers="auto")
        >>> cb.state_key
        "AttentionSensitivityMonitor{'every_n_steps': 100, 'prefix': 'stability/', 'rows_per_head': 64}"
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        rows_per_head: int = 64,
        exact_top: int = 10,
        layers: str | list[int] | None = None,
        batch_size: int | None = None,
        power_iters: int | None = None,
        prefix: str = "stability/",
        prog_bar: bool = False,
        log_heatmap: bool = True,
        strict: bool = False,
        log: str = "all",
    ) -> None:
        super().__init__()
        self._init_schedule(every_n_steps, log)
        self._configure(
            rows_per_head=rows_per_head,
            exact_top=exact_top,
            layers=layers,
            batch_size=batch_size,
            power_iters=power_iters,
            prefix=prefix,
            strict=strict,
        )
        self.prog_bar = check_bool("prog_bar", prog_bar)
        self.log_heatmap = check_bool("log_heatmap", log_heatmap)
        self.guard = FailureGuard(type(self).__name__, self.strict)
        self.core: AttentionMonitor | None = None
        self._pending_state: dict[str, Any] | None = None  # checkpoint state loaded before setup
        self._stack: contextlib.ExitStack | None = None
        self._pending_step = -1
        self._last_step = -1
        self._card_logged = False
        self._heat_theta = HeatmapHistory()
        self._heat_sens = HeatmapHistory(log_scale=True)
        self.last_values: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, prefix=self.prefix, rows_per_head=self.rows_per_head
        )

    @property
    def probe(self) -> AttentionProbe | None:
        """The shared :class:`~thetascope.capture.AttentionProbe` (``None`` before ``fit``, or disabled)."""
        return self.core.probe if self.core is not None else None

    # ------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, type(self).__name__, "projection weight", fsdp2=True)
        n_layers = -1
        if self.guard.active("probe"):
            try:  # on every fit: shared_probe rebuilds the probe when attention modules were added or removed
                n_layers = len(shared_probe(pl_module, **self._probe_settings()).layers)
            except Exception as err:
                self.guard.fail("probe", err, trainer.global_rank)
        # every rank must pack the same layout into each collective: agree once, here, on the probe depth
        counts = [row[0] for row in gather_host_ints(trainer, [n_layers])]
        if len(set(counts)) > 1 or -1 in counts:
            if -1 not in counts:
                rank_zero_warn(
                    f"{type(self).__name__}: ranks found different numbers of attention layers "
                    f"({dict(enumerate(counts))} by rank); attention measurements are disabled on every rank "
                    "(gradient monitoring and training go on).",
                    category=RuntimeWarning,
                )
            self.guard.disable_agreed(["probe"])
            return
        old = self.core
        self.core = AttentionMonitor(pl_module, **self._settings(), guard=self.guard)  # bad layers= raise
        if old is not None:  # a second fit: the power-iteration vectors carry over
            self.core.estimator.load_state_dict(old.estimator.state_dict())
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.core.load_state_dict(state)

    def _probe_settings(self) -> dict[str, Any]:
        return {
            "rows_per_head": self.rows_per_head,
            "batch_size": self.batch_size,
            "exact_top": self.exact_top,
        }

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_capture()

    # ------------------------------------------------------------------------------------------ capture
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.core is None or not self.guard.active("probe"):
            return
        if step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._close_capture()  # a capture left open (e.g. an exception in the previous step)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.core.capture())
        self._pending_step = self._last_step = step

    def _close_capture(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._finish(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        if self._pending_step < 0:
            return
        self._close_capture()
        step, self._pending_step = self._pending_step, -1
        self.measure(trainer, step)

    # ------------------------------------------------------------------------------------------ measure
    def measure(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """Measure, reduce (one collective) and log the values of the forward just captured."""
        assert self.core is not None
        metrics = self.core.reduce(self.core.measure(), trainer_all_gather(trainer))
        try:  # logging after the collective: a failure here needs no agreement
            self._log(trainer, step, metrics)
        except Exception as err:
            self.guard.warn("logging", err, trainer.global_rank)
            return {}
        return metrics

    def _log(self, trainer: pl.Trainer, step: int, metrics: dict[str, float]) -> None:
        assert self.core is not None
        if metrics and self._temperature_logged_elsewhere(trainer):
            metrics.pop(f"{self.prefix}{TEMPERATURE_FIELD}", None)
        log_to_loggers(trainer, metrics, step, self.log_mode, self.prefix)
        publish_callback_metrics(trainer, self.core.headline(metrics), prog_bar=self.prog_bar)
        if self.log_heatmap and metrics and self.core.probe.layers:
            cols = self.core.heatmap_columns(metrics)
            self._heat_theta.append(step, cols["theta_max"])
            self._heat_sens.append(step, cols["sensitivity"])
            if trainer.is_global_zero and trainer.loggers:
                images = {
                    f"{self.prefix}theta_max/heatmap": self._heat_theta.image(),
                    f"{self.prefix}sensitivity/heatmap": self._heat_sens.image(),
                }
                log_images(trainer, images, step)
        if metrics and not self._card_logged:
            self._card_logged = True
            self._log_card(trainer)
        self.last_values = metrics

    def _temperature_logged_elsewhere(self, trainer: pl.Trainer) -> bool:
        from thetascope.callbacks.temperature import TemperatureWarmup

        return any(
            isinstance(cb, TemperatureWarmup) and cb.log_temperature and cb.prefix == self.prefix
            for cb in getattr(trainer, "callbacks", [])
        )

    def architecture_card(self) -> dict[str, Any]:
        """Depth, norm placement, path length m, the recommended ``N^(-1/m)`` scale and residual scaling."""
        if self.core is not None:  # the core knows how to read a sharded model
            return self.core.architecture_card()
        from thetascope.capture.introspect import architecture_card

        return architecture_card(self.probe)

    def _log_card(self, trainer: pl.Trainer) -> None:
        card = self.architecture_card()
        rank_zero_info(
            f"thetascope architecture card: N={card['depth']} attention layers, norm placement "
            f"{card['norm_placement']}, path length m={card['path_length_m']}, recommended per-map scale "
            f"N^(-1/m)={card['recommended_scale']:.4g}, residual scaling: {card['residual_scaling']}"
        )
        if trainer.is_global_zero:
            params = {f"{self.prefix}{CARD_PREFIX}{k}": v for k, v in card.items()}
            for logger in trainer.loggers:
                with contextlib.suppress(Exception):
                    logger.log_hyperparams(params)

    # ------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.core is not None:
            core_state = self.core.state_dict()
        elif self._pending_state is not None:
            core_state = dict(self._pending_state)
        else:
            core_state = {"spectral": SpectralNormEstimator().state_dict(), "probe_captures": None}
        return {**core_state, "last_step": self._last_step, "card_logged": self._card_logged}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            last_step = int(state_dict.get("last_step", -1))
            card_logged = bool(state_dict.get("card_logged", False))
            core_state = {
                "spectral": state_dict["spectral"],
                "probe_captures": state_dict.get("probe_captures"),
            }
            if self.core is not None:
                self.core.load_state_dict(core_state)
            else:  # before setup: check it now (a scratch estimator), apply it when the core exists
                if core_state["probe_captures"] is not None:
                    core_state["probe_captures"] = int(core_state["probe_captures"])
                SpectralNormEstimator().load_state_dict(core_state["spectral"])
                self._pending_state = core_state
        except Exception as err:  # an older or foreign layout: start fresh rather than stop the run
            warn_unreadable_state(type(self).__name__, err)
            if self.core is not None:
                self.core.estimator.reset()
            self._pending_state = None
            self._last_step, self._card_logged = -1, False
            return
        self._last_step, self._card_logged = last_step, card_logged
