"""Two gloo processes measure the Hessian of the global loss: the single-process values on the full batch.

One spawn checks both layers: :class:`CurvatureCore` in a plain DDP loop (float64) and
:class:`CurvatureMonitor` under Lightning's DDP strategy (float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tests.callbacks._models import LM, token_data, trainer
from tests.helpers.ddp import run_ddp
from thetascope.callbacks import CurvatureMonitor
from thetascope.monitors._collective import distributed_all_gather
from thetascope.monitors.curvature import CurvatureCore, distributed_all_reduce_mean

pytestmark = pytest.mark.ddp


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)
    return model, x, y


def _core_run(
    model: nn.Module, train: nn.Module, x: torch.Tensor, y: torch.Tensor, ddp: bool
) -> dict[str, float]:
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


def _lightning_run(root: Path, devices: int, batch_size: int) -> dict[str, float]:
    cb = CurvatureMonitor(every_n_steps=2, iters=6, trace_samples=2, strict=True)
    kwargs: dict[str, Any] = {"devices": devices}
    data = token_data(n=16, batch_size=batch_size)
    if devices > 1:  # unshuffled: the two ranks together see exactly the single-process batches
        kwargs.update(strategy="ddp", use_distributed_sampler=False)
        data = DataLoader(
            data.dataset, batch_size=batch_size, sampler=DistributedSampler(data.dataset, shuffle=False)
        )
    trainer(root, [cb], steps=3, logger=None, **kwargs).fit(LM("demo-pre", d=16, n_head=2), data)
    return dict(cb.last_values)


def _worker(rank: int, world_size: int, root: str) -> dict[str, dict[str, float]]:
    model, x, y = _setup()
    half = x.shape[0] // world_size
    sl = slice(rank * half, (rank + 1) * half)
    core = _core_run(model, nn.parallel.DistributedDataParallel(model), x[sl], y[sl], ddp=True)
    return {"core": core, "lightning": _lightning_run(Path(root), world_size, batch_size=2)}


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    ranks = run_ddp(_worker, world_size=2, args=(str(tmp_path / "ddp"),), timeout=240)
    model, x, y = _setup()
    single = {"core": _core_run(model, model, x, y, ddp=False), "lightning": _lightning_run(tmp_path, 1, 4)}
    for part, rel in (("core", 1e-6), ("lightning", 1e-3)):
        ref = single[part]
        assert ranks[0][part] == ranks[1][part], part  # every rank logs the same values
        assert "stability/curvature/precond_sharpness" in ref
        assert "stability/curvature/taylor_second" in ref
        assert set(ranks[0][part]) == set(ref), part
        for k, v in ref.items():
            assert ranks[0][part][k] == pytest.approx(v, rel=rel, abs=1e-6), (part, k)
