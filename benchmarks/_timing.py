"""Shared harness of the training-loop benchmarks: per-step wall times of a real Lightning ``Trainer`` run.

Each run trains a fresh copy of the same model on the same data with the same seed; only the callbacks differ,
so runs of different configurations can be paired and interleaved.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Run:
    """Per-step times (seconds, index = global step) and peak accelerator memory (bytes, 0 on CPU) of one fit.

    ``times`` is wall clock; ``cpu_times`` the CPU time of the whole process (all its threads), which other
    programs on a shared CPU disturb much less than the wall clock.
    """

    times: list[float]
    cpu_times: list[float]
    peak_bytes: int


def quiet() -> contextlib.AbstractContextManager[None]:
    """Silence Lightning's banners (``lightning.pytorch``/``lightning.fabric`` below ERROR) and every warning
    of the tiny benchmark runs while inside; both are restored on exit."""
    from thetascope.demo.train import quiet_lightning

    return quiet_lightning(("lightning.pytorch", "lightning.fabric"), logging.ERROR, ignore=None)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object], repeat: int = 5, *, stat: Callable[[list[float]], float] = min
) -> float:
    """Seconds of one call of ``fn``: one warm-up call, then ``stat`` (default: the best) of ``repeat`` timed
    calls, each ended by a device sync so queued CUDA work is counted."""
    fn()
    _sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return stat(times)


def timed_fit(
    make_module: Callable[[], Any],
    data: Any,
    callbacks: Sequence[Any],
    steps: int,
    *,
    precision: str = "32-true",
) -> Run:
    """Fit ``make_module()`` for ``steps`` optimizer steps with ``callbacks``; time each step end to end.

    A step is timed from ``on_train_batch_start`` (before the callbacks' own batch-start hooks) to
    ``on_train_batch_end`` (after theirs), with a device sync at both ends on CUDA.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    starts: dict[int, tuple[float, float]] = {}
    times: list[float] = []
    cpu_times: list[float] = []

    class _Start(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            _sync()
            starts[trainer.global_step] = (time.perf_counter(), time.process_time())

    class _End(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            _sync()
            wall, cpu = starts[trainer.global_step - 1]
            times.append(time.perf_counter() - wall)
            cpu_times.append(time.process_time() - cpu)

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[_Start(), *callbacks, _End()],
    )
    trainer.fit(make_module(), data)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return Run(times, cpu_times, peak)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def steps_where(run: Run, keep: Callable[[int], bool], *, cpu: bool = False) -> list[float]:
    """The step times (``cpu``: CPU times) of the steps ``s`` with ``keep(s)``."""
    return [t for s, t in enumerate(run.cpu_times if cpu else run.times) if keep(s)]
