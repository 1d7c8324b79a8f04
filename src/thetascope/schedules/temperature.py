"""Attention-temperature schedules: a pure map from the optimizer step to ``tau``.

Framework-free (no Lightning import). A schedule holds only its configuration; the position is the optimizer
step the caller passes in, so resuming from a checkpoint needs nothing but the step counter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEDULES", "TemperatureSchedule"]

#: Names accepted by ``TemperatureSchedule(schedule=...)``.
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "geometric")


def _check_tau(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


class TemperatureSchedule:
    """Attention temperature ``tau`` as a function of the optimizer step.

    ``tau`` moves from ``tau_start`` at step 0 to ``tau_end`` at ``warmup_steps`` and stays at exactly
    ``tau_end`` from then on. Shapes, with ``t = step / warmup_steps``:

    * ``"linear"``: ``tau_start + (tau_end - tau_start) * t``
    * ``"cosine"``: ``tau_end + (tau_start - tau_end) * (1 + cos(pi * t)) / 2`` (flat at both ends)
    * ``"geometric"``: ``tau_start * (tau_end / tau_start) ** t`` (constant ratio per step)

    Args:
        tau_start: Temperature at step 0 (> 0). Logits are divided by ``tau``, so ``tau > 1`` flattens
            attention.
        tau_end: Temperature from ``warmup_steps`` on (> 0), usually 1.
        warmup_steps: Number of optimizer steps of the warmup (>= 0; 0 means ``tau_end`` throughout).
        schedule: One of ``"linear"``, ``"cosine"``, ``"geometric"``.

    Raises:
        ValueError: An argument is out of range; the message names it and the allowed values.

    Example:
        >>> s = TemperatureSchedule(tau_start=4.0, tau_end=1.0, warmup_steps=100, schedule="linear")
        >>> s(0), s(50), s(100), s(10_000)
        (4.0, 2.5, 1.0, 1.0)
        >>> round(TemperatureSchedule(4.0, 1.0, 100, "geometric")(50), 6)
        2.0
    """

    def __init__(
        self,
        tau_start: float = 4.0,
        tau_end: float = 1.0,
        warmup_steps: int = 1000,
        schedule: str = "linear",
    ) -> None:
        self.tau_start = _check_tau("tau_start", tau_start)
        self.tau_end = _check_tau("tau_end", tau_end)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        """Temperature at optimizer step ``step`` (0-based; exactly ``tau_end`` for ``step >= warmup_steps``).

        Raises:
            ValueError: ``step`` is negative.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step >= self.warmup_steps:
            return self.tau_end
        t = step / self.warmup_steps
        if self.schedule == "linear":
            return self.tau_start + (self.tau_end - self.tau_start) * t
        if self.schedule == "cosine":
            return self.tau_end + (self.tau_start - self.tau_end) * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.tau_start * (self.tau_end / self.tau_start) ** t

    def is_done(self, step: int) -> bool:
        """True once ``step`` has reached the end of the warmup (``tau`` is ``tau_end`` from here on)."""
        return int(step) >= self.warmup_steps

    def state_dict(self) -> dict[str, Any]:
        """Plain-data configuration (the position is the optimizer step, kept by the trainer)."""
        return {
            "tau_start": self.tau_start,
            "tau_end": self.tau_end,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a configuration saved by :meth:`state_dict` (validated like the constructor)."""
        other = TemperatureSchedule(
            tau_start=state["tau_start"],
            tau_end=state["tau_end"],
            warmup_steps=state["warmup_steps"],
            schedule=state["schedule"],
        )
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tau_start={self.tau_start}, tau_end={self.tau_end}, "
            f"warmup_steps={self.warmup_steps}, schedule={self.schedule!r})"
        )
