"""Soak: 2,000 optimizer steps with all three callbacks measuring on every step. Process memory, the number
of live tensors and of Python objects stay flat after warm-up, and the work of a step does not grow.

Tiny model (2 layers, d=16, 2 heads, sequence 8, batch 2) on one CPU thread; the temperature warmup ends at
step 1,000 so both phases run. Bounds are generous (this runs on shared machines); a leak of one small tensor
per step, or a per-step growth of nested Python containers, breaks them. The work of a step is its number of
device operations (exact, unlike its time on a shared machine, which is reported but not asserted): two
windows of 20 steps after the warmup, a whole number of detector refresh periods each, must run as many.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from benchmarks._ops import OpCounter

from tests.reliability._util import LM, all_logged_finite, callbacks, fit, token_data

pytestmark = pytest.mark.reliability

STEPS = 2000
CHECKPOINTS = (500, 1000, 1500, STEPS - 1)
RSS_GROWTH_MB = 24.0  # after warm-up (step 500 -> end)
TENSOR_GROWTH = 64  # live tensors, after warm-up
OBJECT_GROWTH = 1000  # gc-tracked Python objects (lists, dicts, ...), after warm-up: < 1 per step
OPS_WINDOWS = (range(1100, 1120), range(1900, 1920))  # after the warmup: the same callbacks run in both


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _live_tensors() -> int:
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj):
                count += 1
        except Exception:  # some objects raise on attribute access (e.g. half-torn-down proxies)
            continue
    return count


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []
        self.rss: dict[int, float] = {}
        self.tensors: dict[int, int] = {}
        self.objects: dict[int, int] = {}
        self._paused = 0.0
        self.ops: list[int] = [0 for _ in OPS_WINDOWS]
        self._counter: OpCounter | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if any(trainer.global_step in w for w in OPS_WINDOWS):
            self._counter = OpCounter()
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step - 1  # the optimizer step that just finished
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            window = next(i for i, w in enumerate(OPS_WINDOWS) if step in w)
            self.ops[window] += self._counter.n
            self._counter = None
        self.ends.append(time.perf_counter() - self._paused)
        if step in CHECKPOINTS:
            t0 = time.perf_counter()
            self.rss[step] = _rss_mb()
            self.tensors[step] = _live_tensors()
            self.objects[step] = len(gc.get_objects())
            self._paused += time.perf_counter() - t0  # keep the counting out of the step times

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def _floor(xs: list[float], block: int = 100) -> float:
    """Lowest median over consecutive blocks of ``block`` steps.

    Other processes on a shared machine slow whole stretches of steps down; a real drift (work growing with
    the step count) slows every block, so the least disturbed block is the fair reading of a window.
    """
    return min(statistics.median(xs[i : i + block]) for i in range(0, len(xs) - block + 1, block))


def test_soak_2000_steps_memory_tensors_and_step_time_are_flat(tmp_path: Path) -> None:
    rec = _Recorder()  # one intra-op thread: see conftest.py
    cbs = callbacks(every=1, rows=2, warmup=1000, heatmap=True)
    t0 = time.perf_counter()
    trainer, m = fit(
        tmp_path,
        LM("demo-pre", n_layer=2, d=16, n_head=2),
        [*cbs, rec],
        data=token_data(n=64, seq=8, batch_size=2),
        steps=STEPS,
    )
    wall = time.perf_counter() - t0

    assert trainer.global_step == STEPS
    assert all_logged_finite(m) == []
    assert len(m["stability/theta_max/layer_01"]) == STEPS  # really measured on every step
    assert len(m["stability/grad_norm/global"]) == STEPS

    rss_growth = rec.rss[STEPS - 1] - rec.rss[500]
    tensor_growth = rec.tensors[STEPS - 1] - rec.tensors[500]
    object_growth = rec.objects[STEPS - 1] - rec.objects[500]
    times = rec.step_times()
    early, late = _floor(times[200:500]), _floor(times[-300:])
    report = (
        f"soak: {STEPS} steps in {wall:.1f} s; RSS MB {rec.rss}; live tensors {rec.tensors}; "
        f"gc-tracked objects {rec.objects}; "
        f"step ms early {1e3 * early:.2f} late {1e3 * late:.2f} (x{late / early:.2f}); "
        f"device operations of steps {OPS_WINDOWS[0]} and {OPS_WINDOWS[1]}: {rec.ops}"
    )
    print(report)
    assert rss_growth <= RSS_GROWTH_MB, report
    assert tensor_growth <= TENSOR_GROWTH, report
    assert object_growth <= OBJECT_GROWTH, report
    assert rec.ops[0] > 20 * 100, report  # really counted: every step measures
    assert rec.ops[1] <= rec.ops[0] * 1.01, report


def test_models_are_released_after_fit(tmp_path: Path) -> None:
    """Fitting many models in one process (a sweep, a notebook) must not keep them alive: once the user drops
    the model, the trainer and the callbacks, the model is garbage."""
    import weakref

    refs = []
    for i in range(3):
        model = LM("demo-pre", n_layer=2, d=16, n_head=2)
        refs.append(weakref.ref(model))
        fit(tmp_path / str(i), model, callbacks(), steps=2)
        del model
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
