"""TemperatureWarmup: attention-temperature warmup as a Lightning callback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from thetascope import keys
from thetascope._validation import check_bool, check_prefix
from thetascope.callbacks._lightning import (
    StateCheckedCallback,
    log_to_loggers,
    publish_callback_metrics,
    warn_unreadable_state,
)
from thetascope.monitors.temperature import TemperatureController
from thetascope.schedules.temperature import TemperatureSchedule

if TYPE_CHECKING:
    from thetascope.capture.probe import AttentionProbe

__all__ = ["TemperatureWarmup"]


class TemperatureWarmup(StateCheckedCallback):
    """Divide every attention layer's logits by ``tau``, annealed from ``tau_start`` to ``tau_end``.

    ``tau`` is a pure function of ``trainer.global_step`` (the optimizer step), set before every training
    batch, so it is exactly reproduced after resuming from a checkpoint and it is the same on every
    gradient-accumulation micro-batch of one optimizer step. It changes only the attention logits: it does not
    touch the optimizer, learning rate or any LR scheduler, and it needs no monitored metric. With ``log`` it
    logs ``{prefix}temperature`` at ``global_step % log_every_n_steps == 0`` and at the end of the warmup, and
    puts it into ``trainer.callback_metrics``.

    Outside training steps (a decision): validation, test and predict use the tau of the current
    ``global_step``, so the model is evaluated as it is being trained. Once ``global_step`` reaches
    ``warmup_steps`` tau is ``tau_end``; for ``tau_end == 1`` the interception is then removed, so the model's
    outputs are bitwise those of the model without any hook. When ``fit`` ends the temperature is left at the
    last value it had (the model keeps behaving as trained); call :meth:`remove` to take the hooks off.

    Temperature warmup is not a replacement for learning-rate warmup (see the project's design notes: it did
    not rescue post-LN training where LR warmup did). Without Lightning, use
    :class:`~thetascope.monitors.TemperatureController`.

    Args:
        tau_start: temperature at step 0 (> 0).
        tau_end: temperature from ``warmup_steps`` on (> 0), usually 1.
        warmup_steps: optimizer steps of the warmup (>= 0).
        schedule: ``"linear"``, ``"cosine"`` or ``"geometric"`` (see
            :class:`~thetascope.schedules.TemperatureSchedule`).
        log: log ``{prefix}temperature`` on logging steps.
        prefix: key prefix.

    Example:
        >>> from thetascope.callbacks import TemperatureWarmup
        >>> cb = TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=500, schedule="cosine")
        >>> cb.tau_at(0), cb.tau_at(500)
        (4.0, 1.0)
    """

    def __init__(
        self,
        tau_start: float = 4.0,
        tau_end: float = 1.0,
        warmup_steps: int = 1000,
        schedule: str = "linear",
        log: bool = True,
        prefix: str = keys.DEFAULT_PREFIX,
    ) -> None:
        super().__init__()
        self.schedule = TemperatureSchedule(
            tau_start=tau_start, tau_end=tau_end, warmup_steps=warmup_steps, schedule=schedule
        )
        self.log_temperature = check_bool("log", log)
        self.prefix = check_prefix(prefix)
        self.controller = TemperatureController(None, self.schedule)
        self._last_logged_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            tau_start=self.schedule.tau_start,
            tau_end=self.schedule.tau_end,
            warmup_steps=self.schedule.warmup_steps,
            schedule=self.schedule.schedule,
        )

    def tau_at(self, step: int) -> float:
        """The temperature this callback uses at optimizer step ``step``."""
        return self.schedule(step)

    @property
    def temperature(self) -> float:
        """The temperature currently applied to the model (1.0 before setup)."""
        return self.controller.tau

    @property
    def probe(self) -> AttentionProbe | None:
        """The shared :class:`~thetascope.capture.AttentionProbe` (``None`` before setup)."""
        return self.controller.probe

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        first = self.controller.probe is None
        # on every setup: the shared probe is rebuilt when attention modules were added or removed
        probe = self.controller.bind(pl_module)
        if first:
            s = self.schedule
            rank_zero_info(
                f"TemperatureWarmup: {len(probe.layers)} attention layer(s), "
                f"tau {s.tau_start} -> {s.tau_end} over {s.warmup_steps} steps ({s.schedule})"
            )

    def _apply(self, step: int) -> float:
        return self.controller.step(step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        tau = self._apply(step)
        if not self.log_temperature or step == self._last_logged_step:
            return
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 0), 0)
        if (every and step % every == 0) or step == self.schedule.warmup_steps:
            self._last_logged_step = step
            key = self.prefix + keys.TEMPERATURE_FIELD
            log_to_loggers(trainer, {key: tau}, step)
            publish_callback_metrics(trainer, {key: tau})

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer.global_step)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer.global_step)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer.global_step)

    def remove(self) -> None:
        """Take the temperature hooks off the model (tau back to 1)."""
        self.controller.remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.controller.state_dict(), "last_logged_step": self._last_logged_step}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            last = int(state_dict.get("last_logged_step", -1))
            self.controller.load_state_dict(state_dict)
        except Exception as err:  # an older or foreign layout: keep this callback's own configuration
            warn_unreadable_state(type(self).__name__, err)
            self._last_logged_step = -1
            return
        self._last_logged_step = last
