"""``benchmarks/gpu.py`` runs end to end on tiny shapes (CPU), so ``make bench-gpu`` does not rot."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the script runs the full GPT-2 shapes")
def test_gpu_benchmark_runs_small_shapes_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    results = gpu.main([])  # no CUDA: --small is automatic
    assert list(results) == [s.name for s in gpu.SMALL]
    for res in results.values():
        for key in ("unmeasured_ratio", "amortised_ratio", "bracket_vs_greedy", "svd_vs_power"):
            assert math.isfinite(res[key]), key
            assert res[key] > 0, key
        assert math.isfinite(res["measured_step_fraction"])
        assert math.isnan(res["peak_memory_ratio"])  # no accelerator memory on CPU
        assert res["power_rel_err"] <= 1e-3  # the estimator's accuracy contract, checked against an SVD
    out = capsys.readouterr().out
    assert "tiny shapes, the numbers mean nothing" in out
    for key in gpu.GOALS:
        assert key in out
