"""Real 2-process DDP (gloo, CPU): values equal one process, one writer, no deadlock on a one-rank failure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.callbacks._models import LM, read_csv_metrics, token_data, trainer
from tests.helpers.ddp import run_ddp
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor
from thetascope.monitors.attention import AttentionMonitor

pytestmark = pytest.mark.ddp


def _fit(root: Path, devices: int, batch_size: int, fail_rank: int | None) -> dict[str, Any]:
    grad = GradientFlowMonitor(every_n_steps=2, strict=False)
    attn = AttentionSensitivityMonitor(every_n_steps=2, rows_per_head=64, strict=False)
    if (
        fail_rank is not None
        and torch.distributed.is_initialized()
        and torch.distributed.get_rank() == fail_rank
    ):
        original = AttentionMonitor._layer_stats

        def flaky(self: AttentionMonitor, rec: Any) -> dict[str, torch.Tensor]:
            if rec.index == 1:
                raise RuntimeError("rank-local failure")
            return original(self, rec)

        AttentionMonitor._layer_stats = flaky  # type: ignore[method-assign]  # this worker process only
    kwargs: dict[str, Any] = {"devices": devices}
    data = token_data(n=16, batch_size=batch_size)
    if devices > 1:
        # Lightning's automatic DistributedSampler always shuffles training data; an unshuffled one gives rank
        # r
        # samples r, r + 2, ... so the two ranks together see exactly the single-process batches
        kwargs.update(strategy="ddp", use_distributed_sampler=False)
        sampler = DistributedSampler(data.dataset, shuffle=False)
        data = DataLoader(data.dataset, batch_size=batch_size, sampler=sampler)
    t = trainer(root, [grad, attn], steps=3, **kwargs)
    t.fit(LM("demo-pre"), data)
    return {
        "grad": dict(grad.last_values),
        "attn": dict(attn.last_values),
        "callback_metrics": {
            k: float(v) for k, v in t.callback_metrics.items() if k.startswith("stability/")
        },
        "disabled": sorted(attn.guard.disabled),
    }


def _worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    return _fit(Path(root), devices=world_size, batch_size=2, fail_rank=1)


def test_ddp_matches_single_process_and_survives_rank_failure(tmp_path: Path) -> None:
    single = _fit(tmp_path / "single", devices=1, batch_size=4, fail_rank=None)
    ranks = run_ddp(_worker, world_size=2, args=(str(tmp_path / "ddp"),), timeout=240)

    # every rank agrees (values come out of one collective), and the failure on rank 1 disabled layer 1
    # everywhere
    assert ranks[0]["callback_metrics"] == ranks[1]["callback_metrics"]
    assert ranks[0]["disabled"] == ranks[1]["disabled"] == ["layer_01"]
    for r in ranks:
        assert not any("layer_01" in k for k in r["attn"])
        assert all(math.isfinite(v) for v in r["attn"].values())

    # gradients are averaged by DDP: per-layer and global norms equal the single-process run on the same 4
    # samples
    for key, value in single["grad"].items():
        if key.startswith("stability/grad/") and "spike" in key:
            continue
        assert ranks[0]["grad"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    # attention: max over ranks = max over the union of rows; sums/counts make means and percentiles exact
    for name in (
        "theta_max",
        "theta_max_lower",
        "theta_mean",
        "theta_frac_099",
        "theta_p10",  # a histogram summed in the one collective: exact across ranks
        "entropy",
        "attn_input_max_norm",
        "residual_max_norm",
        "proj_norm",
        "nonfinite_rows",
    ):
        key = f"stability/{name}/layer_00"
        assert ranks[0]["attn"][key] == pytest.approx(single["attn"][key], rel=1e-4, abs=1e-6), key

    # logged once: only rank zero writes, each measurement step appears once
    csv = read_csv_metrics(tmp_path / "ddp/csv/version_0/metrics.csv")
    assert set(csv["stability/grad_norm/global"]) == {0, 2}
    assert set(csv["stability/theta_max/layer_00"]) == {0, 2}
    lines = (tmp_path / "ddp/csv/version_0/metrics.csv").read_text().splitlines()
    assert sum(1 for line in lines[1:] if line.split(",")[lines[0].split(",").index("step")] == "0") <= 3
