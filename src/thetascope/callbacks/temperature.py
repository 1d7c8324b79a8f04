"""TemperatureWarmup: attention-temperature warmup as a Lightning callback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from thetascope.callbacks._lightning import (
    log_to_loggers,
    publish_callback_metrics,
    warn_if_state_missing,
    warn_unreadable_state,
)
from thetascope.capture.registry import shared_probe
from thetascope.schedules.temperature import TemperatureSchedule

__all__ = ["TemperatureWarmup"]


class TemperatureWarmup(Callback):
    """Divide every attention layer's logits by ``tau``, annealed from ``tau_start`` to ``tau_end``.

    ``tau`` is a pure function of ``trainer.global_step`` (the optimizer step), set before every training
    batch,
    so it is exactly reproduced after resuming from a checkpoint and it is the same on every
    gradient-accumulation micro-batch of one optimizer step. It changes only the attention logits: it does not
    touch the optimizer, learning rate or any LR scheduler, and it needs no monitored metric.

    Behaviour outside training steps (a decision, documented here): validation, test and predict use the tau
    of
    the current ``global_step`` — the model is evaluated as it is being trained. Once ``global_step`` reaches
    ``warmup_steps`` tau is ``tau_end``; for ``tau_end == 1`` the interception is then removed, so the model's
    outputs are bitwise those of the model without any hook. When ``fit`` ends the temperature is left at the
    last value it had (the model keeps behaving as trained); call :meth:`remove` to take the hooks off.

    Temperature warmup is not a replacement for learning-rate warmup (see the project's design notes: it did
    not
    rescue post-LN training where LR warmup did).

    Args:
        tau_start: temperature at step 0 (> 0).
        tau_end: temperature from ``warmup_steps`` on (> 0), usually 1.
        warmup_steps: optimizer steps of the warmup (>= 0).
        schedule: ``"linear"``, ``"cosine"`` or ``"geometric"`` (see
            :class:`~thetascope.schedules.TemperatureSchedule`).
        log: log ``{prefix}temperature`` on logging steps (``global_step % log_every_n_steps == 0``).
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
        prefix: str = "stability/",
    ) -> None:
        super().__init__()
        self.schedule = TemperatureSchedule(
            tau_start=tau_start, tau_end=tau_end, warmup_steps=warmup_steps, schedule=schedule
        )
        if not isinstance(log, bool):
            raise ValueError(f"log must be True or False, got {log!r}")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string such as 'stability/', got {prefix!r}")
        self.log_temperature = log
        self.prefix = prefix
        self._probe: Any = None
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
        return 1.0 if self._probe is None else float(self._probe.temperature)

    @property
    def probe(self) -> Any:
        """The shared :class:`~thetascope.capture.AttentionProbe` (``None`` before setup)."""
        return self._probe

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        first = self._probe is None
        # on every setup: shared_probe rebuilds the probe when attention modules were added or removed
        self._probe = shared_probe(pl_module)
        if first:
            rank_zero_info(
                f"TemperatureWarmup: {len(self._probe.layers)} attention layer(s), "
                f"tau {self.schedule.tau_start} -> "
                f"{self.schedule.tau_end} over {self.schedule.warmup_steps} steps ({self.schedule.schedule})"
            )

    def _apply(self, step: int) -> float:
        tau = self.schedule(step)
        if self._probe is not None and tau != self._probe.temperature:
            self._probe.set_temperature(tau)
        return tau

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
            key = f"{self.prefix}temperature"
            log_to_loggers(trainer, {key: tau}, step)
            publish_callback_metrics(trainer, {key: tau})

    def _eval_start(self, trainer: pl.Trainer) -> None:
        self._apply(trainer.global_step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    def remove(self) -> None:
        """Take the temperature hooks off the model (tau back to 1)."""
        if self._probe is not None:
            self._probe.set_temperature(1.0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "last_logged_step": self._last_logged_step}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            last = int(state_dict.get("last_logged_step", -1))
            # validated as a whole before anything is replaced: a partial layout leaves this schedule as is
            self.schedule.load_state_dict(state_dict["schedule"])
        except Exception as err:  # an older or foreign layout: keep this callback's own configuration
            warn_unreadable_state(type(self).__name__, err)
            self._last_logged_step = -1
            return
        self._last_logged_step = last

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        warn_if_state_missing(self, checkpoint)
