"""Two gloo processes measure the Hessian of the global loss: the single-process values on the full batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.ddp import run_ddp
from thetascope.monitors._collective import distributed_all_gather
from thetascope.monitors.curvature import CurvatureCore, distributed_all_reduce_mean


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)
    return model, x, y


def _run(model: nn.Module, train: nn.Module, x: torch.Tensor, y: torch.Tensor, ddp: bool) -> dict[str, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    core = CurvatureCore(model, iters=30, trace_samples=3)
    kwargs = {"all_reduce": distributed_all_reduce_mean()} if ddp else {}
    gather = distributed_all_gather() if ddp else None
    out: dict[str, float] = {}
    for _ in range(3):
        opt.zero_grad()
        ((train(x) - y) ** 2).mean().backward()
        core.snapshot(opt)
        opt.step()
        vals = core.measure(lambda: ((model(x) - y) ** 2).mean(), opt, **kwargs)
        out = core.reduce(vals, gather) if gather is not None else core.reduce(vals)
    return out


def _worker(rank: int, world_size: int) -> dict[str, float]:
    model, x, y = _setup()
    half = x.shape[0] // world_size
    sl = slice(rank * half, (rank + 1) * half)
    ddp = nn.parallel.DistributedDataParallel(model)
    return _run(model, ddp, x[sl], y[sl], ddp=True)


@pytest.mark.timeout(120)
def test_ddp_two_processes_match_single_process() -> None:
    ranks = run_ddp(_worker, world_size=2)
    model, x, y = _setup()
    ref = _run(model, model, x, y, ddp=False)
    assert ranks[0] == ranks[1]  # every rank logs the same values
    keys = [k for k in ref if "curvature/" in k]
    assert "stability/curvature/precond_sharpness" in keys
    assert "stability/curvature/taylor_second" in keys
    assert set(ranks[0]) == set(ref)
    for k in keys:
        assert ranks[0][k] == pytest.approx(ref[k], rel=1e-5, abs=1e-9), k
