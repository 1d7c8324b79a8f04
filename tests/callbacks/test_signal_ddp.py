"""SignalPropagationMonitor under real 2-process DDP (gloo, CPU): one collective, ranks agree, one writer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.callbacks._models import LM, read_csv_metrics, token_data, trainer
from tests.helpers.ddp import run_ddp
from thetascope.callbacks import SignalPropagationMonitor

pytestmark = pytest.mark.ddp


def _worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    mon = SignalPropagationMonitor(every_n_steps=2, n_probes=2, max_samples=2)
    local: list[dict[str, torch.Tensor]] = []
    core_measure = None

    data = token_data(n=16, batch_size=2)
    loader = DataLoader(data.dataset, batch_size=2, sampler=DistributedSampler(data.dataset, shuffle=False))
    t = trainer(Path(root), [mon], steps=3, devices=world_size, strategy="ddp", use_distributed_sampler=False)

    original_setup = mon.setup

    def setup(trainer_: Any, pl_module: Any, stage: str) -> None:
        nonlocal core_measure
        original_setup(trainer_, pl_module, stage)
        assert mon.core is not None
        core_measure = mon.core.measure

        def measure(forward: Any) -> dict[str, torch.Tensor]:
            assert core_measure is not None
            vals = core_measure(forward)
            local.append({k: v.clone() for k, v in vals.items()})
            return vals

        mon.core.measure = measure  # type: ignore[method-assign]

    mon.setup = setup  # type: ignore[method-assign]
    lm = LM("demo-dyt", n_layer=4, d=16, n_head=2)
    t.fit(lm, loader)
    return {
        "values": dict(mon.last_values),
        "local_apjn": [v["apjn"].tolist() for v in local],
        "local_sat": [(v["saturated"].sum().item(), v["elements"].sum().item()) for v in local],
        "params": [p.detach().clone() for p in lm.parameters()],
    }


def test_ddp_ranks_agree_on_the_mean_of_their_measurements(tmp_path: Path) -> None:
    ranks = run_ddp(_worker, world_size=2, args=(str(tmp_path),), timeout=240)
    r0, r1 = ranks
    assert r0["values"] == r1["values"]
    assert r0["values"]
    assert len(r0["local_apjn"]) == len(r1["local_apjn"]) == 2  # steps 0 and 2
    for layer in range(4):
        mean = (r0["local_apjn"][-1][layer] + r1["local_apjn"][-1][layer]) / 2
        assert r0["values"][f"stability/apjn/layer_{layer:02d}"] == pytest.approx(mean, rel=1e-6)
    assert r0["local_apjn"][-1] != r1["local_apjn"][-1]  # each rank measured its own held batch
    (s0, n0), (s1, n1) = r0["local_sat"][-1], r1["local_sat"][-1]
    assert r0["values"]["stability/signal/norm_saturation"] == pytest.approx((s0 + s1) / (n0 + n1))
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    assert set(csv["stability/apjn/layer_03"]) == {0, 2}
    assert all(math.isfinite(v) for v in csv["stability/signal/stretched_beta"].values())
    lines = (tmp_path / "csv/version_0/metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("stability/apjn/layer_00")
    assert sum(1 for line in lines[1:] if line.split(",")[col]) == 2  # rank zero wrote each measurement once
