"""``benchmarks/bench_ops.py`` counts the operations of every path; the counts hold what the code promises."""

from __future__ import annotations

import pytest

from benchmarks import bench_ops


def test_operation_counts_per_path_and_per_layer(capsys: pytest.CaptureFixture[str]) -> None:
    results = bench_ops.main((1, 2), shapes=(("tiny GPT", 2, 64, 4, 2), ("tiny GPT, 4 layers", 4, 64, 4, 2)))
    one, two = results[1], results[2]
    per_step = "per-step path (grad norm + 2 detector pushes)"
    # one fused norm and two deferred pushes, whatever the depth
    assert one[per_step] == two[per_step] < 15
    # the stacked statistics: the reduction does not grow with depth
    assert one["AttentionMonitor.reduce"] == two["AttentionMonitor.reduce"]
    capture = bench_ops.CAPTURE
    assert 0 < two[capture] - one[capture] < 200
    # the accelerator policy brackets the rows of every layer together: fewer operations per layer
    gpu = f"{capture}, as on a GPU"
    assert two[gpu] - one[gpu] < two[capture] - one[capture] - 40
    assert "per layer" in capsys.readouterr().out
    # the demo GPT on the meta device: every path runs there (no host sync before the gradient reduction)
    small, deep = results["tiny GPT"], results["tiny GPT, 4 layers"]
    whole = "measured step, all of the above"
    assert (
        small[whole]
        == small[capture] + small[bench_ops.MEASURE] + small["GradientFlowCore.measure (to its host copy)"]
    )
    assert small["per-step path"] == deep["per-step path"] < 30
    # two more layers cost a bounded number of launches each in the captured forward
    assert 0 < (deep[capture] - small[capture]) / 2 < 60
