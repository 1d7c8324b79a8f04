"""Hugging Face ``transformers.Trainer`` integration: the thetascope monitor cores as a ``TrainerCallback``.

``transformers`` is imported only when this module is (it is an optional dependency).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from thetascope._validation import (
    check_bool,
    check_choice,
    check_layers_arg,
    check_positive_int,
    check_prefix,
)
from thetascope.keys import DEFAULT_PREFIX, LOG_MODES, headline_only
from thetascope.monitors._collective import AllGather, distributed_all_gather, local_all_gather
from thetascope.report.diagnosis import MeasuredHistory

__all__ = ["StabilityCallback"]

_log = logging.getLogger(__name__)


def _all_gather() -> AllGather:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return distributed_all_gather(None)
    return local_all_gather


def _loss_of(output: Any) -> Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        loss = output[0] if output[0].numel() == 1 else None
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


class StabilityCallback(TrainerCallback):
    """Attention sensitivity, gradient flow and temperature warmup for ``transformers.Trainer`` runs.

    Drives the same framework-free cores as the Lightning callbacks
    (:class:`~thetascope.monitors.attention.AttentionMonitor`,
    :class:`~thetascope.monitors.gradient.GradientFlowCore`,
    :class:`~thetascope.monitors.temperature.TemperatureController`), so the keys and values are the same.
    A measurement covers the optimizer step that brings ``state.global_step`` to a multiple of
    ``every_n_steps`` (by default the Trainer's ``logging_steps``), and its values go through
    ``Trainer.log``: they appear in ``trainer.state.log_history`` as a row of their own with that ``step``,
    and reach every reporter of ``report_to`` (TensorBoard, W&B, MLflow, ...) like the Trainer's own loss.

    What it sees:

    * attention: the training forward of the first micro-batch of the measured step (a one-shot forward hook
      on the model closes the capture right after it; no hook stays on other steps);
    * gradients: the Trainer gives callbacks no hook between the backward and its gradient clipping, so the
      gradients are read in ``on_pre_optimizer_step``, after clipping. With ``max_grad_norm > 0`` (the
      Trainer's default is 1.0) the per-layer and global norms are the CLIPPED ones: all scaled by the same
      factor ``min(1, max_grad_norm / ||g||)``, so the depth profile (``grad/early_late_ratio``,
      ``log_slope``, ``min_max_ratio``, ``vanishing_layers``) is unchanged, but absolute norms are capped at
      ``max_grad_norm`` and the gradient spike detector sees capped values. The Trainer's own ``grad_norm``
      is the pre-clip global norm. Set ``max_grad_norm=0`` for pre-clip per-layer norms (the callback then
      sees exactly the gradients being stepped);
    * loss spikes: the ``loss`` of the model's output on the first micro-batch of every step;
    * temperature: ``temperature`` (a :class:`~thetascope.schedules.TemperatureSchedule`) divides the
      attention logits from the first forward of each optimizer step.

    With ``log="summary"`` only the headline keys are logged. At the end of training (world process zero)
    the diagnosis of everything measured is written to this module's logger and kept in ``self.diagnosis``.

    Args:
        every_n_steps: measure every this many optimizer steps; ``None``: the Trainer's ``logging_steps``.
        attention: measure attention sensitivity.
        gradients: measure gradient flow and spikes.
        temperature: a temperature warmup schedule, or ``None``.
        rows_per_head: query rows sampled per (batch item, head).
        layers: per-layer keys to log: ``"all"``/``None``, ``"auto"`` or a list of layer indices.
        batch_size: measure only the first ``batch_size`` items of the batch.
        prefix: key prefix.
        log: ``"all"`` or ``"summary"``.
        strict: raise on a failed measurement instead of warning once and disabling it.

    Example:
        >>> cb = StabilityCallback(every_n_steps=10, log="summary")
        >>> trainer.add_callback(cb.attach(trainer))  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        attention: bool = True,
        gradients: bool = True,
        temperature: Any = None,
        rows_per_head: int = 64,
        layers: str | list[int] | None = None,
        batch_size: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        log: str = "all",
        strict: bool = False,
    ) -> None:
        self.every_n_steps = (
            None if every_n_steps is None else check_positive_int("every_n_steps", every_n_steps)
        )
        self.attention = check_bool("attention", attention)
        self.gradients = check_bool("gradients", gradients)
        if temperature is not None:
            from thetascope.schedules.temperature import TemperatureSchedule

            if not isinstance(temperature, TemperatureSchedule):
                raise ValueError(f"temperature must be a TemperatureSchedule or None, got {temperature!r}")
        self.schedule = temperature
        self.rows_per_head = check_positive_int("rows_per_head", rows_per_head)
        self.layers = check_layers_arg(layers)
        self.batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        self.prefix = check_prefix(prefix)
        self.log_mode = check_choice("log", log, LOG_MODES)
        self.strict = check_bool("strict", strict)
        self.trainer: Any = None
        self.att: Any = None
        self.grad: Any = None
        self.temp: Any = None
        #: Everything measured (host floats, every key also in summary mode): what the diagnosis reads.
        self.history = MeasuredHistory(prefix=self.prefix)
        #: The values of the latest measurement (every key, also in summary mode).
        self.last_values: dict[str, float] = {}
        self.diagnosis: Any = None
        self._every = 1
        self._measuring = False
        self._first_forward = False
        self._att_values: dict[str, Tensor] | None = None
        self._grad_values: dict[str, Tensor] | None = None
        self._capture: contextlib.ExitStack | None = None
        self._hooks: list[Any] = []
        self._pending: dict[str, float] = {}

    def attach(self, trainer: Any) -> StabilityCallback:
        """Remember ``trainer`` so values go through ``trainer.log``; returns self for ``add_callback``.

        Without it (the callback passed in ``callbacks=[...]``) values are added to the Trainer's log row of
        the measured step instead: they reach ``log_history`` and the reporters that run after this callback,
        but not the default ``report_to`` reporters, which the Trainer calls first.
        """
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------------------------------- setup
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any
    ) -> None:
        if model is None:
            raise RuntimeError("StabilityCallback: the Trainer passed no model to on_train_begin")
        if self.every_n_steps is not None:
            self._every = self.every_n_steps
        else:
            steps = args.logging_steps
            self._every = max(math.ceil(steps * state.max_steps) if steps < 1 else int(steps), 1)
        if self.attention and self.att is None:
            from thetascope.monitors.attention import AttentionMonitor

            try:
                self.att = AttentionMonitor(
                    model,
                    rows_per_head=self.rows_per_head,
                    layers=self.layers,
                    batch_size=self.batch_size,
                    prefix=self.prefix,
                    strict=self.strict,
                )
            except ValueError as err:  # no attention found, or layers= naming a missing layer
                if self.strict:
                    raise
                warnings.warn(f"StabilityCallback: attention not measured: {err}", UserWarning, stacklevel=2)
                self.attention = False
        if self.gradients and self.grad is None:
            from thetascope.monitors.gradient import GradientFlowCore

            self.grad = GradientFlowCore(model, layers=self.layers, prefix=self.prefix, strict=self.strict)
        if self.schedule is not None and self.temp is None:
            from thetascope.monitors.temperature import TemperatureController

            self.temp = TemperatureController(model, self.schedule)
        self._hooks.append(model.register_forward_hook(self._after_forward))

    # ------------------------------------------------------------------------------------------- per step
    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        step = state.global_step
        if self.temp is not None:
            self.temp.step(step)
        # the step that brings global_step to a multiple of the interval (HF logs at the post-update count)
        self._measuring = (step + 1) % self._every == 0
        self._first_forward = True
        if self._measuring and self.att is not None:
            self._capture = contextlib.ExitStack()
            self._capture.enter_context(self.att.capture())

    def _after_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._first_forward:
            return
        self._first_forward = False
        if self.grad is not None:
            loss = _loss_of(output)
            if loss is not None:
                self.grad.observe_loss(loss.detach())
        if self._capture is not None:
            self._capture.close()
            self._capture = None
            self._att_values = self.att.measure()

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
    ) -> None:
        if self.grad is None:
            return
        self.grad.observe_step(optimizer)
        if self._measuring:
            self._grad_values = self.grad.measure(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._capture is not None:  # the forward hook never ran (no forward this step)
            self._capture.close()
            self._capture = None
        if not self._measuring:
            return
        self._measuring = False
        gather = _all_gather()
        values: dict[str, float] = {}
        if self.att is not None and self._att_values is not None:
            values.update(self.att.reduce(self._att_values, gather))
        if self.grad is not None and self._grad_values is not None:
            values.update(self.grad.reduce(self._grad_values, gather))
        if self.temp is not None:
            values[f"{self.prefix}temperature"] = float(self.temp.tau)
        self._att_values = self._grad_values = None
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        if not values:
            return
        step = state.global_step
        self.last_values = values
        self.history.add(step, values)
        shown = headline_only(values, self.prefix) if self.log_mode == "summary" else values
        if self.trainer is not None:
            # Trainer.log resets control.should_log (its own loss row of this step would be dropped): keep it
            should_log = control.should_log
            self.trainer.log(dict(shown))
            control.should_log = should_log
        else:
            self._pending = dict(shown)
            control.should_log = True

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    # ------------------------------------------------------------------------------------------- end
    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self.temp is not None:
            self.temp.remove()
        if state.is_world_process_zero and len(self.history):
            self.diagnosis = self.history.diagnose(run="transformers.Trainer")
            _log.info("%s", self.diagnosis.text())
