"""Shared pieces of the reliability suite: tiny models, the three callbacks, fault injectors, log readers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from tests.callbacks._models import LM, read_csv_metrics, token_data, trainer
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup

__all__ = [
    "LM",
    "InjectGrad",
    "SkipNonFiniteStep",
    "all_logged_finite",
    "callbacks",
    "fit",
    "read_csv_metrics",
    "recorded_warnings",
    "token_data",
    "trainer",
]


def callbacks(
    every: int = 1, strict: bool = False, rows: int = 4, warmup: int = 4, heatmap: bool = False
) -> list[Any]:
    """The three callbacks, measuring every ``every`` optimizer steps, few rows per head."""
    return [
        TemperatureWarmup(tau_start=2.0, tau_end=1.0, warmup_steps=warmup),
        AttentionSensitivityMonitor(
            every_n_steps=every, rows_per_head=rows, strict=strict, log_heatmap=heatmap
        ),
        GradientFlowMonitor(every_n_steps=every, spike_action="none", strict=strict, log_heatmap=heatmap),
    ]


def fit(
    root: Path,
    module: pl.LightningModule,
    cbs: list[Any],
    data: Any = None,
    steps: int = 6,
    **kwargs: Any,
) -> tuple[pl.Trainer, dict[str, dict[int, float]]]:
    """Fit with a CSV logger; return the trainer and ``key -> {step: value}`` of everything logged."""
    t = trainer(root, cbs, steps=steps, **kwargs)
    t.fit(module, data if data is not None else token_data(n=16, seq=8, batch_size=2))
    path = root / "csv" / "version_0" / "metrics.csv"
    return t, (read_csv_metrics(path) if path.exists() else {})


def all_logged_finite(metrics: dict[str, dict[int, float]], prefix: str = "stability/") -> list[str]:
    """Keys under ``prefix`` that were logged with a non-finite value (empty when the log is clean)."""
    return sorted(
        k
        for k, by_step in metrics.items()
        if k.startswith(prefix) and not all(map(math.isfinite, by_step.values()))
    )


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Every warning message raised inside the block (all categories, no filtering)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        try:
            yield messages
        finally:
            messages.extend(str(w.message) for w in caught)


class InjectGrad(pl.Callback):
    """Write ``value`` into one gradient element of ``param`` after the backward of step ``step``."""

    def __init__(self, param: str, step: int, value: float) -> None:
        self.param, self.step, self.value = param, step, value

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            grad = dict(pl_module.named_parameters())[self.param].grad
            assert grad is not None
            grad.view(-1)[0] = self.value


class SkipNonFiniteStep(pl.Callback):
    """Emulate a loss scaler skipping a step: zero every gradient when any is non-finite.

    Placed after the monitors in the callback list, so they see the non-finite gradients first; keeps the
    parameters finite so training goes on (a test helper: it syncs on every step).
    """

    def __init__(self) -> None:
        self.skipped: list[int] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.skipped.append(trainer.global_step)
            for g in grads:
                g.zero_()


def blocks(module: Any) -> Any:
    """The block list of a demo/nanoGPT LM wrapped in a LightningModule (``module.model.transformer.h``)."""
    return module.model.transformer.h


def nonfinite_rows(metrics: dict[str, dict[int, float]], step: int) -> float:
    """Sum over layers of ``nonfinite_rows/layer_XX`` at ``step``."""
    return sum(v.get(step, 0.0) for k, v in metrics.items() if k.startswith("stability/nonfinite_rows/"))


def finite(t: Tensor) -> bool:
    """All entries finite (host sync; tests only)."""
    return bool(torch.isfinite(t).all())
