"""TemperatureController: the attention temperature of a model as a function of the optimizer step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from thetascope.schedules.temperature import TemperatureSchedule

if TYPE_CHECKING:
    from thetascope.capture.probe import AttentionProbe

__all__ = ["TemperatureController"]


class TemperatureController:
    """Divides every attention layer's logits by ``schedule(step)``, through the model's shared probe.

    :meth:`step` sets ``tau`` for an optimizer step (call it before the forward passes of that step; it is a
    pure function of the step, so a resumed run repeats the same sequence). Only the attention logits change:
    the optimizer and learning rate are untouched. Once the warmup is over and ``tau_end == 1`` the
    interception is removed, so the model's outputs are bitwise those of the model without hooks. The probe
    is the one the attention monitor measures (:func:`~thetascope.capture.registry.shared_probe`), so its rows
    are those of the tempered logits.

    Args:
        model: the model (``None``: call :meth:`bind` before :meth:`step`).
        schedule: the step -> ``tau`` map.

    Raises:
        ValueError: the model has no attention module the probe recognises.

    Example:
        >>> from thetascope.demo.model import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
        >>> temp = TemperatureController(model, TemperatureSchedule(4.0, 1.0, 10))
        >>> temp.step(0), temp.step(5), temp.tau
        (4.0, 2.5, 2.5)
        >>> temp.remove(); temp.tau
        1.0
    """

    def __init__(self, model: nn.Module | None, schedule: TemperatureSchedule) -> None:
        if not isinstance(schedule, TemperatureSchedule):
            raise ValueError(f"schedule must be a TemperatureSchedule, got {schedule!r}")
        self.schedule = schedule
        self.probe: AttentionProbe | None = None
        if model is not None:
            self.bind(model)

    def bind(self, model: nn.Module) -> AttentionProbe:
        """Attach to ``model``'s shared probe (rebuilt when its attention modules changed since last time)."""
        from thetascope.capture.registry import shared_probe

        self.probe = shared_probe(model)
        return self.probe

    @property
    def tau(self) -> float:
        """The temperature currently applied to the model (1.0 when not bound)."""
        return 1.0 if self.probe is None else float(self.probe.temperature)

    def step(self, global_step: int) -> float:
        """Set ``tau`` for optimizer step ``global_step`` and return it."""
        tau = self.schedule(global_step)
        if self.probe is not None and tau != self.probe.temperature:
            self.probe.set_temperature(tau)
        return tau

    def remove(self) -> None:
        """Take the temperature interception off the model (``tau`` back to 1)."""
        if self.probe is not None:
            self.probe.set_temperature(1.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the schedule's configuration (the position is the optimizer step)."""
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (validated as a whole: a bad layout leaves the schedule as it was)."""
        self.schedule.load_state_dict(state["schedule"])
