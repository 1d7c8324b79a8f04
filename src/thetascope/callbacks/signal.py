"""SignalPropagationMonitor: APJN depth profile, criticality verdict and DyT/Derf state, in Lightning."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from thetascope._validation import check_positive_int
from thetascope.callbacks._lightning import (
    StateCheckedCallback,
    log_to_loggers,
    publish_callback_metrics,
    refuse_sharded,
    trainer_all_gather,
    warn_unreadable_state,
)
from thetascope.keys import DEFAULT_PREFIX
from thetascope.monitors.signal import DEFAULT_SATURATION_THRESHOLD, SignalPropagationCore

__all__ = ["SignalPropagationMonitor"]


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of every tensor in ``batch`` (detached copies; other values kept)."""
    if isinstance(batch, Tensor):
        return batch[:n].detach().clone()
    if isinstance(batch, Mapping):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_head(v, n) for v in batch]
    if isinstance(batch, tuple):  # a plain tuple (a namedtuple batch becomes one; the default forward agrees)
        return tuple(_head(v, n) for v in batch)
    return batch


def _default_forward(module: pl.LightningModule, batch: Any) -> Any:
    """``module(batch)`` for a tensor, ``module(batch[0])`` for a tuple or list, ``module(**batch)`` else."""
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(batch[0])
    return module(batch)


class SignalPropagationMonitor(StateCheckedCallback):
    """APJN from the first block's input to every block's output, its depth fits, and DyT/Derf saturation.

    Measures at fit start, on the first training batch before the first optimizer step (the
    initialisation), and then every ``every_n_steps`` optimizer steps if given (``global_step % n == 0``, once
    per optimizer step, never on accumulation micro-steps), always on the same held batch: the first
    ``max_samples`` samples of the first training batch of the run. Logged at ``step = global_step`` from
    rank zero (keys: :class:`~thetascope.monitors.signal.SignalPropagationCore`): ``{prefix}apjn/layer_XX``
    and ``apjn_stderr/layer_XX``, the power-law and stretched-exponential fits and ``{prefix}signal/verdict``
    (-1 subcritical, 0 critical, 1 supercritical), ``{prefix}card/signal_verdict``, and for DyT/Derf-like
    modules ``{prefix}norm_alpha/...`` and ``{prefix}norm_saturation/...``. The verdict line at initialisation
    (:attr:`card_line`) is also printed once on rank zero. The fits and verdict go to
    ``trainer.callback_metrics`` too.

    A measurement costs one forward of the held batch and ``n_probes`` backward passes per block (see ``make
    bench``); it runs the model in eval mode with a forked RNG and writes no parameter gradients, so training
    is bit-for-bit the same with or without the callback. Under DDP each rank measures its own held batch and
    the values are averaged with one collective. Sharded strategies (FSDP, DeepSpeed) are refused at setup.

    Args:
        every_n_steps: measure again every this many optimizer steps; ``None`` measures at fit start only.
        n_probes: Hutchinson probes per block (>= 2; the standard error falls like ``1/sqrt(n_probes)``).
        max_samples: samples of the first batch kept as the held batch (>= 1).
        saturation_threshold: ``|alpha * x (+ shift)|`` beyond which a DyT/Derf element counts as saturated.
        forward: ``forward(pl_module, batch)`` running the model on a batch; default: ``pl_module(batch)``
            for a tensor, ``pl_module(batch[0])`` for a tuple/list, ``pl_module(**batch)`` for a dict.
        layers: per-layer APJN keys to log (``"all"``/``None``, ``"auto"`` or indices); fits use every block.
        prefix: key prefix.
        strict: raise on a failed measurement instead of warning once and disabling it.
        seed: seed of the probe generator.

    Example:
        >>> SignalPropagationMonitor(every_n_steps=100).state_key
        "SignalPropagationMonitor{'every_n_steps': 100, 'prefix': 'stability/'}"
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        n_probes: int = 4,
        max_samples: int = 4,
        saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD,
        forward: Callable[[pl.LightningModule, Any], Any] | None = None,
        layers: str | list[int] | None = None,
        prefix: str = DEFAULT_PREFIX,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_steps = (
            None if every_n_steps is None else check_positive_int("every_n_steps", every_n_steps)
        )
        self.max_samples = check_positive_int("max_samples", max_samples)
        if forward is not None and not callable(forward):
            raise ValueError(f"forward must be a callable forward(pl_module, batch) or None, got {forward!r}")
        self.forward = forward or _default_forward
        # the core validates the rest now, so a bad argument fails at construction, not at setup
        self._settings: dict[str, Any] = dict(
            n_probes=n_probes,
            saturation_threshold=saturation_threshold,
            layers=layers,
            prefix=prefix,
            strict=strict,
            seed=seed,
        )
        SignalPropagationCore(torch.nn.ModuleList([torch.nn.Linear(1, 1)]), **self._settings)
        self.prefix = prefix
        self.core: SignalPropagationCore | None = None
        self._held: Any = None
        self._measured_init = False
        self._last_step = -1
        self._restored: Mapping[str, Any] | None = None
        self.last_values: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, prefix=self.prefix)

    @property
    def card_line(self) -> str | None:
        """The architecture-card line: the verdict and its numbers at initialisation (after fit start)."""
        return self.core.card_line() if self.core is not None else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, type(self).__name__, "block")
        from thetascope.capture.registry import unwrap_compiled

        self.core = SignalPropagationCore(unwrap_compiled(pl_module), **self._settings)
        if self._restored is not None:
            self.core.load_state_dict(self._restored.get("core", {}))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        core = self.core
        if core is None or step == self._last_step:
            return
        due = (not self._measured_init and step == 0) or (
            self.every_n_steps is not None and step % self.every_n_steps == 0
        )
        if not due:
            return
        self._last_step = step
        self._measured_init = True
        if self._held is None:
            self._held = _head(batch, self.max_samples)
        held = self._held
        values = core.measure(lambda: self.forward(pl_module, held))
        metrics = core.reduce(values, trainer_all_gather(trainer))
        if not metrics:
            return
        try:
            log_to_loggers(trainer, metrics, step)
            publish_callback_metrics(trainer, core.headline(metrics))
            if core.init_fit is not None and core.last_fit is core.init_fit:
                rank_zero_info(f"SignalPropagationMonitor: {core.card_line()}")
        except Exception as err:  # logging never stops training
            core.guard.warn("logging", err, trainer.global_rank)
        self.last_values = metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured_init": self._measured_init,
            "last_step": self._last_step,
            "core": self.core.state_dict()
            if self.core is not None
            else dict(self._restored or {}).get("core"),
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            self._measured_init = bool(state_dict["measured_init"])
            self._last_step = int(state_dict["last_step"])
            self._restored = {"core": dict(state_dict.get("core") or {})}
            if self.core is not None:
                self.core.load_state_dict(self._restored["core"])
        except Exception as err:  # an older or foreign layout: start fresh rather than stop the run
            warn_unreadable_state(type(self).__name__, err)
            self._measured_init, self._last_step, self._restored = False, -1, None
