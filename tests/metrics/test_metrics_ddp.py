"""Every metric gives the same result in 2 gloo processes (uneven split) as in one process over all the data.

All DDP checks share ONE spawned run: starting a process group costs seconds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.ddp import run_ddp
from tests.metrics._reference import entropy_nats, mixed_rows, theta_exhaustive
from thetascope.functional.theta import ThetaBounds
from thetascope.metrics import AttentionEntropy, BalancedMassFactor, GradientFlow, SensitivityProxy

N_KEYS = 8  # <= exact_top: brackets are exact, so exhaustive enumeration is the reference
RANK_BATCHES = {0: [0, 1, 2], 1: [3, 4]}  # uneven: different numbers of batches and of rows
RANK_STEPS = {0: [0, 1, 2, 3, 4], 1: [5, 6]}
RANK_PARTS = {0: [0], 1: [1, 2]}


def _batches() -> list[torch.Tensor]:
    sizes = [17, 3, 40, 9, 26]
    batches = [mixed_rows(n, N_KEYS, seed=100 + i).float() for i, n in enumerate(sizes)]
    batches[2][5, 0] = float("nan")  # a non-finite row, on rank 0
    batches[4][1] = float("nan")  # and one on rank 1
    return batches


def _bounds() -> ThetaBounds:
    nan = float("nan")
    return ThetaBounds(torch.tensor([0.3, nan, 0.995]), torch.tensor([0.4, nan, 1.0]))


def _grad_steps() -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    steps = torch.linspace(0.0, -2.0, 6).exp() * (0.5 + torch.rand(7, 6, generator=gen))
    steps[6, 2] = float("inf")
    return steps


def _sensitivity_parts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-part (micro-batch) layer maxima of theta and B̄, and G, of 4 layers; part 2 has a NaN theta."""
    gen = torch.Generator().manual_seed(11)
    theta, b_bar = torch.rand(3, 4, generator=gen), 1.0 + 5.0 * torch.rand(3, 4, generator=gen)
    theta[2, 1] = float("nan")
    return theta, b_bar, 0.5 + torch.rand(4, generator=gen)


def _make_metrics() -> dict[str, Any]:
    return {
        "theta": BalancedMassFactor(),
        "theta_one_rank": BalancedMassFactor(),  # only rank 1 updates
        "entropy": AttentionEntropy(),
        "entropy_one_rank": AttentionEntropy(),  # only rank 1 updates
        "grad": GradientFlow(),
        "grad_one_rank": GradientFlow(),  # only rank 0 updates: rank 1 keeps size-0 states
        "sensitivity": SensitivityProxy(),
        "sensitivity_one_rank": SensitivityProxy(),  # only rank 1 updates
    }


def _feed(metrics: dict[str, Any], rank: int | None) -> None:
    """Feed one rank's share of the data; ``rank=None`` is the single process that sees everything."""
    batches, steps = _batches(), _grad_steps()
    every_batch = [i for share in RANK_BATCHES.values() for i in share]
    every_step = [s for share in RANK_STEPS.values() for s in share]
    for i in every_batch if rank is None else RANK_BATCHES[rank]:
        metrics["theta"].update(batches[i])
        metrics["entropy"].update(batches[i])
    for i in RANK_BATCHES[1] if rank in (None, 1) else []:
        metrics["theta_one_rank"].update(batches[i])
        metrics["entropy_one_rank"].update(batches[i])
    if rank in (None, 0):
        metrics["theta"].update_bounds(_bounds())
    for s in every_step if rank is None else RANK_STEPS[rank]:
        metrics["grad"].update(steps[s])
    for s in RANK_STEPS[0] if rank in (None, 0) else []:
        metrics["grad_one_rank"].update(steps[s])
    theta, b_bar, proj_norm = _sensitivity_parts()
    for part in RANK_PARTS[1] if rank in (None, 1) else []:
        metrics["sensitivity_one_rank"].update(theta[part], b_bar[part], proj_norm, tau=2.0)
    for part in [0, 1, 2] if rank is None else RANK_PARTS[rank]:
        metrics["sensitivity"].update(theta[part], b_bar[part], proj_norm, tau=2.0)


def _ddp_worker(rank: int, world_size: int) -> dict[str, Any]:
    # Metrics that only one rank updates warn on the other rank; expected here.
    warnings.filterwarnings("ignore", message="The ``compute`` method", category=UserWarning)
    metrics = _make_metrics()
    _feed(metrics, rank)
    results: dict[str, Any] = {name: metric.compute() for name, metric in metrics.items()}
    # Ranks that saw different layer counts must fail loudly (on every rank), not reduce garbage.
    mismatch = GradientFlow()
    mismatch.update(torch.ones(3 + rank))
    try:
        mismatch.compute()
        results["mismatch_error"] = None
    except ValueError as err:
        results["mismatch_error"] = str(err)
    # A synced compute leaves each rank's local states untouched (next interval continues locally).
    results["local_n_rows"] = metrics["theta"].n_rows.clone()
    return results


@pytest.mark.ddp
def test_two_process_ddp_equals_single_process() -> None:
    per_rank = run_ddp(_ddp_worker, world_size=2, timeout=120)

    single = _make_metrics()
    _feed(single, None)
    expected = {name: metric.compute() for name, metric in single.items()}

    for rank, got in enumerate(per_rank):
        for name, values in expected.items():
            assert set(got[name]) == set(values), name
            for key, value in values.items():
                torch.testing.assert_close(
                    got[name][key],
                    value,
                    rtol=1e-6,
                    atol=1e-6,
                    equal_nan=True,
                    msg=f"rank {rank} {name}/{key}",
                )
        assert got["mismatch_error"] is not None
        assert "different numbers of layers" in got["mismatch_error"]
        assert "[3, 4]" in got["mismatch_error"]
    assert int(per_rank[0]["local_n_rows"]) == 17 + 3 + 39 + 2  # rank 0 rows, plus its 2 finite bounds
    assert int(per_rank[1]["local_n_rows"]) == 9 + 25

    # Independent references over all rows (exhaustive theta, numpy entropy and RMS).
    rows = np.concatenate([b.double().numpy() for b in _batches()])
    finite = np.isfinite(rows).all(axis=1)
    rows = rows[finite] / rows[finite].sum(axis=1, keepdims=True)
    theta = np.concatenate([theta_exhaustive(rows), [0.35, 0.9975]])
    got = per_rank[0]
    assert int(got["theta"]["n_rows"]) == theta.size
    assert int(got["theta"]["n_nonfinite"]) == 3
    assert float(got["theta"]["mean"]) == pytest.approx(theta.mean(), abs=1e-6)
    assert float(got["theta"]["max"]) == pytest.approx(1.0, abs=1e-6)
    assert float(got["theta"]["p10"]) == pytest.approx(np.quantile(theta, 0.1), abs=1e-3 + 1e-6)
    lower = np.concatenate([theta_exhaustive(rows), [0.3, 0.995]])
    assert float(got["theta"]["frac_ge_threshold"]) == pytest.approx((lower >= 0.99).mean(), abs=1e-6)

    raw = np.concatenate([b.double().numpy() for b in _batches()])
    ent = entropy_nats(raw)
    ent = ent[np.isfinite(ent)]
    assert float(got["entropy"]["mean"]) == pytest.approx(ent.mean(), abs=1e-6)
    assert float(got["entropy"]["min"]) == pytest.approx(ent.min(), abs=1e-6)

    steps = _grad_steps().double().numpy()
    finite_steps = np.where(np.isfinite(steps), steps, np.nan)
    rms = np.sqrt(np.nanmean(finite_steps**2, axis=0))
    np.testing.assert_allclose(got["grad"]["layer_norms"].numpy(), rms, rtol=1e-6)
    assert int(got["grad"]["n_nonfinite"]) == 1
    rms0 = np.sqrt((steps[:5] ** 2).mean(axis=0))
    np.testing.assert_allclose(got["grad_one_rank"]["layer_norms"].numpy(), rms0, rtol=1e-6)
    assert math.isclose(
        float(got["grad_one_rank"]["global_norm"]), float(np.sqrt((rms0**2).sum())), rel_tol=1e-6
    )

    theta_parts, b_parts, proj_norm = (x.double().numpy() for x in _sensitivity_parts())
    s_ref = np.nanmax(theta_parts, axis=0) / 2.0 * b_parts.max(axis=0) ** 2 * proj_norm
    np.testing.assert_allclose(got["sensitivity"]["sensitivity"].numpy(), s_ref, rtol=1e-6)
    assert int(got["sensitivity"]["n_nonfinite"]) == 1
