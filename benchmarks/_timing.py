"""Shared harness of the training-loop benchmarks: per-step wall times of a real Lightning ``Trainer`` run.

Each run trains a fresh copy of the same model on the same data with the same seed; only the callbacks differ,
so runs of different configurations can be paired and interleaved.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Run:
    """Per-step times (seconds, index = global step) and peak accelerator memory (bytes, 0 on CPU) of one fit.

    ``times`` is wall clock; ``cpu_times`` the CPU time of the whole process (all its threads), which other
    programs on a shared CPU disturb much less than the wall clock. ``starts`` are the steps' start times on
    ``time.perf_counter`` (system-wide on Linux, so comparable between processes there).
    """

    times: list[float]
    cpu_times: list[float]
    peak_bytes: int
    starts: list[float] = field(default_factory=list)

    def series(self, cpu: bool = False) -> list[float]:
        """``cpu_times`` if ``cpu``, else ``times``."""
        return self.cpu_times if cpu else self.times


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
    after_step: Callable[[], None] | None = None,
) -> Run:
    """Fit ``make_module()`` for ``steps`` optimizer steps with ``callbacks``; time each step end to end.

    A step is timed from ``on_train_batch_start`` (before the callbacks' own batch-start hooks) to
    ``on_train_batch_end`` (after theirs), with a device sync at both ends on CUDA. ``after_step`` is called
    after each step's clocks are read (:func:`lockstep_fits` passes the turn there).
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
            if after_step is not None:
                after_step()

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
    return Run(times, cpu_times, peak, [starts[s][0] for s in range(len(times))])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def step_ratios(run: Run, base: Run, keep: Callable[[int], bool], *, cpu: bool = False) -> list[float]:
    """``run``'s time of step ``s`` over ``base``'s, for the steps ``s`` with ``keep(s)``.

    From runs in lockstep (:func:`lockstep_fits`) the two steps of a pair ran moments apart, so a drift of the
    machine cancels in each ratio.
    """
    return [x / y for s, (x, y) in enumerate(zip(run.series(cpu), base.series(cpu))) if keep(s)]


def steps_where(run: Run, keep: Callable[[int], bool], *, cpu: bool = False) -> list[float]:
    """The step times (``cpu``: CPU times) of the steps ``s`` with ``keep(s)``."""
    return [t for s, t in enumerate(run.series(cpu)) if keep(s)]


#: Seconds a lockstep worker waits for its turn before it gives up (another worker has failed).
TURN_TIMEOUT_S = 600.0


class FitJob(Protocol):
    """What :func:`lockstep_fits` runs in a worker: a module-level (picklable) callable.

    ``job(config, round_index)`` returns ``(make_module, data, callbacks)`` for one fit; ``job.warm(config)``
    runs whatever first-call costs should not land in a timed fit (called once per worker, in its turn).
    """

    def __call__(self, config: str, round_index: int) -> tuple[Callable[[], Any], Any, Sequence[Any]]: ...

    def warm(self, config: str) -> None: ...


def _lockstep_worker(
    index: int,
    sems: Sequence[Any],
    job: FitJob,
    config: str,
    round_index: int,
    steps: int,
    threads: int,
    results: Any,
) -> None:
    torch.set_num_threads(threads)
    import lightning.pytorch  # noqa: F401  (imports outside the turns: they run concurrently)

    mine, following = sems[index], sems[(index + 1) % len(sems)]

    def take_turn() -> None:
        if not mine.acquire(timeout=TURN_TIMEOUT_S):
            raise RuntimeError(f"lockstep worker {config!r}: no turn within {TURN_TIMEOUT_S:.0f} s")

    def pass_turn() -> None:
        following.release()
        take_turn()

    take_turn()
    try:
        with quiet():
            job.warm(config)
            make_module, data, callbacks = job(config, round_index)
            run = timed_fit(make_module, data, callbacks, steps, after_step=pass_turn)
        results.put((index, run, None))
    except Exception as err:  # reported by the parent, which then stops every worker
        results.put((index, None, f"{type(err).__name__}: {err}"))
    finally:
        following.release()


def ring_order(configs: Sequence[str], round_index: int) -> list[str]:
    """The ring of round ``round_index``: the first configuration, then the others rotated by the round.

    So no configuration always follows the same one (a step inherits the caches of the step before it): with
    four configurations, three rounds put each of the first three after each other one once.
    """
    first, rest = list(configs[:1]), list(configs[1:])
    k = round_index % len(rest) if rest else 0
    return first + rest[k:] + rest[:k]


def lockstep_fits(
    job: FitJob, configs: Sequence[str], steps: int, rounds: int, *, threads: int
) -> dict[str, list[Run]]:
    """``rounds`` fits per configuration, in each round one worker process per configuration, taking turns
    step by step.

    The workers pass one token round a ring: a worker runs (sets up, trains one step, tears down) only while
    it holds the token and hands it on after each timed step, so the configurations never compete for the
    CPU and each one's step ``s`` runs right after the others' step ``s``. Drifts of a shared machine (other
    tenants, frequency) then hit the configurations alike step by step, not fit by fit, and paired ratios
    of a few percent become measurable. Every step starts after another process's step; each round has fresh
    processes and its own ring order (:func:`ring_order`), so neither a process's memory layout nor its place
    in the ring stays with one configuration.
    """
    runs: dict[str, list[Run]] = {c: [] for c in configs}
    for r in range(rounds):
        order = ring_order(configs, r)
        for config, run in zip(order, _lockstep_round(job, order, r, steps, threads)):
            runs[config].append(run)
    return runs


def _lockstep_round(
    job: FitJob, order: Sequence[str], round_index: int, steps: int, threads: int
) -> list[Run]:
    ctx = multiprocessing.get_context("spawn")
    sems = [ctx.Semaphore(0) for _ in order]
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_lockstep_worker,
            args=(i, sems, job, config, round_index, steps, threads, results),
            daemon=True,
        )
        for i, config in enumerate(order)
    ]
    for w in workers:
        w.start()
    sems[0].release()
    runs: dict[int, Run] = {}
    errors: list[str] = []
    try:
        while len(runs) < len(order) and not errors:
            try:
                index, got, error = results.get(timeout=1.0)
            except queue.Empty:
                # a worker that died without a word (killed, or failed while starting up) ends the wait
                silent = [i for i, w in enumerate(workers) if not w.is_alive() and i not in runs]
                if silent:
                    try:
                        index, got, error = results.get(timeout=5.0)  # its report may still be in flight
                    except queue.Empty:
                        i = silent[0]
                        errors.append(f"{order[i]}: worker exited with code {workers[i].exitcode}")
                        continue
                else:
                    continue
            if error is not None:
                errors.append(f"{order[index]}: {error}")
            else:
                runs[index] = got
    finally:
        for w in workers:
            w.join(timeout=30 if not errors else 1)
            if w.is_alive():
                # SIGKILL: inside a fit, Lightning's own SIGTERM handler would keep the worker waiting for its
                # turn (and this process, at exit, for the worker) until the turn timeout
                w.kill()
                w.join(timeout=5)
    if errors:
        raise RuntimeError("lockstep fits failed: " + "; ".join(errors))
    return [runs[i] for i in range(len(order))]
