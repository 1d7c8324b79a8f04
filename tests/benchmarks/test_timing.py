"""The lockstep harness of ``make bench``: worker processes run one at a time, step by step, in ring order."""

from __future__ import annotations

import itertools
import sys

import pytest
from benchmarks._timing import ring_order

from benchmarks import bench_callbacks


@pytest.mark.skipif(sys.platform != "linux", reason="perf_counter is system-wide (comparable) on Linux")
def test_lockstep_workers_take_turns_step_by_step() -> None:
    steps = 4
    configs = ("none", "temperature")
    runs = bench_callbacks.run_rounds(configs, steps, rounds=1, every=50, warmup=2, threads=1)
    assert sorted(runs) == sorted(configs)
    intervals: list[tuple[float, float, str, int]] = []
    for config in configs:
        (run,) = runs[config]
        assert len(run.times) == len(run.cpu_times) == len(run.starts) == steps
        assert all(t > 0 for t in run.times)
        intervals += [
            (start, start + t, config, s) for s, (start, t) in enumerate(zip(run.starts, run.times))
        ]
    intervals.sort()
    # ring order: step s of every configuration (in the order given) before step s + 1 of any
    assert [(c, s) for _, _, c, s in intervals] == [(c, s) for s in range(steps) for c in configs]
    # one at a time: each timed step ends before the next one starts
    for (_, end, *_), (start, *_) in itertools.pairwise(intervals):
        assert end <= start


def test_lockstep_reports_a_failing_worker() -> None:
    with pytest.raises(RuntimeError, match="unknown config 'nonsense'"):
        bench_callbacks.run_rounds(("none", "nonsense"), 2, rounds=1, every=50, warmup=2, threads=1)


def test_ring_order_changes_each_configurations_predecessor() -> None:
    configs = ("a", "b", "c", "d")
    orders = [ring_order(configs, r) for r in range(4)]
    assert all(sorted(o) == list(configs) for o in orders)
    assert orders[0] == list(configs)
    assert orders == [ring_order(configs, r) for r in range(4)]  # the same rings in every run
    for c in configs:
        assert len({o[o.index(c) - 1] for o in orders}) >= 2  # not always after the same configuration
