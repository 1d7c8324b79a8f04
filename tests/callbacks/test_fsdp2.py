"""FSDP2: a real ``Trainer(strategy=ModelParallelStrategy(...))``, 2 gloo ranks, ``fully_shard`` per block.

Every logged value equals a single-process run on the same data; one writer; a rank-local failure inside the
distributed power iteration neither deadlocks nor leaves the ranks disagreeing; a resume restores the
power-iteration vectors and the spike state; the collectives of one measurement are counted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from tests.callbacks._models import LM, MemoryLogger, token_data, trainer
from tests.helpers.ddp import run_ddp
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor

pytestmark = pytest.mark.ddp

# per-rank quantities (which rank's detector saw what) and setup-time values that need not match one process
_NOT_COMPARED = ("spike", "temperature")


class ShardedLM(LM):
    """The demo GPT with ``fully_shard`` on every block and on the root (FSDP2, data-parallel mesh)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer["h"]:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class SpikyLM(ShardedLM):
    """Multiplies one step's loss on rank 1 only by 1e4: the averaged gradient spikes on every rank."""

    spike_step = 24

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.spike_step and self.global_rank == 1:
            loss = loss * 1e4
        return loss


def _strategy() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _loader(n: int, batch_size: int, sharded: bool) -> DataLoader:
    data = token_data(n=n, batch_size=batch_size)
    if not sharded:
        return data
    # unshuffled: rank r gets samples r, r + 2, ..., so the two ranks together see the single-process batch
    return DataLoader(
        data.dataset, batch_size=batch_size, sampler=DistributedSampler(data.dataset, shuffle=False)
    )


def _fit(
    root: Path,
    sharded: bool,
    steps: int,
    every: int,
    module: type[LM] = LM,
    ckpt: Path | None = None,
    save: Path | None = None,
    **grad_kwargs: Any,
) -> dict[str, Any]:
    grad = GradientFlowMonitor(every_n_steps=every, **grad_kwargs)
    attn = AttentionSensitivityMonitor(every_n_steps=every, rows_per_head=64)
    logger = MemoryLogger()
    kwargs: dict[str, Any] = {"devices": 1}
    if sharded:
        kwargs = {"devices": 2, "strategy": _strategy(), "use_distributed_sampler": False}
    t = trainer(root, [grad, attn], steps=steps, logger=logger, **kwargs)
    model = module("demo-pre")
    t.fit(model, _loader(4, 2 if sharded else 4, sharded), ckpt_path=str(ckpt) if ckpt else None)
    if save is not None:
        t.save_checkpoint(save)
    return {
        "logged": logger.metrics,
        "card": {k: v for k, v in logger.hparams.items() if "card/" in k},
        "grad": dict(grad.last_values),
        "attn": dict(attn.last_values),
        "global_step": t.global_step,
        "spectral_keys": sorted(attn.core.estimator.keys()) if attn.core is not None else [],
        "disabled": sorted(attn.guard.disabled),
    }


def _compared(logged: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {
        k: v
        for k, v in logged.items()
        if k.startswith("stability/") and not any(s in k for s in _NOT_COMPARED)
    }


def _equal_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    return _fit(Path(root), sharded=True, steps=5, every=2, module=ShardedLM)


def test_fsdp2_matches_single_process(tmp_path: Path) -> None:
    single = _fit(tmp_path / "single", sharded=False, steps=5, every=2)
    ranks = run_ddp(_equal_worker, world_size=2, args=(str(tmp_path / "fsdp2"),), timeout=240)
    ref, got = _compared(single["logged"]), _compared(ranks[0]["logged"])
    assert set(got) == set(ref)
    for key in ("stability/grad_norm/global", "stability/theta_max/layer_00", "stability/proj_norm/layer_01"):
        assert key in ref, key
    for key, by_step in ref.items():
        assert set(got[key]) == set(by_step) == {0, 2, 4}, key
        for step, value in by_step.items():
            assert got[key][step] == pytest.approx(value, rel=2e-4, abs=1e-6), (key, step)
    # the architecture card (path length m from W_Q/W_K sharing, read in the sharded forward) is the same
    assert ranks[0]["card"] == single["card"]
    assert single["card"]["stability/card/path_length_m"] == 4
    # keys once, from rank zero: rank 1 wrote nothing; both ranks computed the same reduced values
    assert not any(k.startswith("stability/") for k in ranks[1]["logged"])
    assert ranks[0]["grad"] == ranks[1]["grad"]
    assert ranks[0]["attn"] == ranks[1]["attn"]
    assert all(math.isfinite(v) for r in ranks for v in r["attn"].values())


def _resume_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    base = Path(root)
    out: dict[str, Any] = {}
    for name, kwargs in (
        ("full", {"steps": 60}),
        ("first", {"steps": 30, "save": base / "ckpt"}),
        ("resumed", {"steps": 60, "ckpt": base / "ckpt"}),
    ):
        grad = GradientFlowMonitor(every_n_steps=10)
        attn = AttentionSensitivityMonitor(every_n_steps=10, rows_per_head=64)
        logger = MemoryLogger()
        t = trainer(
            base / name,
            [grad, attn],
            steps=kwargs["steps"],
            logger=logger,
            devices=2,
            strategy=_strategy(),
            use_distributed_sampler=False,
        )
        ckpt = kwargs.get("ckpt")
        t.fit(ShardedLM("demo-pre"), _loader(4, 2, True), ckpt_path=str(ckpt) if ckpt else None)
        if "save" in kwargs:
            t.save_checkpoint(kwargs["save"])
        assert attn.core is not None
        out[name] = {
            "logged": _compared(logger.metrics) | {k: v for k, v in logger.metrics.items() if "spike" in k},
            "vectors": attn.core.estimator.state_dict()["vectors"],
            "grad_detector": grad.core.grad_detector.state_dict(),
            "loss_detector": grad.core.loss_detector.state_dict(),
        }
    # spike_action="stop": a spike on one rank's loss stops every rank at the same step
    grad = GradientFlowMonitor(every_n_steps=4, spike_action="stop")
    t = trainer(
        base / "spiky",
        [grad],
        steps=40,
        logger=None,
        devices=2,
        strategy=_strategy(),
        use_distributed_sampler=False,
    )
    t.fit(SpikyLM("demo-pre"), _loader(4, 2, True))
    out["stopped_at"] = t.global_step
    out["spike"] = grad.last_values.get("stability/grad/spike")
    return out


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two states differ (tensors to float tolerance)."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, Tensor):
        same = a.shape == b.shape and torch.allclose(
            a.double(), b.double(), rtol=1e-5, atol=1e-7, equal_nan=True
        )
        return [] if same else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_fsdp2_resume_restores_vectors_and_spike_state_and_stop_agrees(tmp_path: Path) -> None:
    ranks = run_ddp(_resume_worker, world_size=2, args=(str(tmp_path),), timeout=280)
    r0 = ranks[0]
    full, resumed = r0["full"]["logged"], r0["resumed"]["logged"]
    compared = 0
    for key, by_step in full.items():
        for step in (30, 40, 50):  # the measurements of optimizer steps 31-60
            if step in by_step:
                assert resumed[key][step] == pytest.approx(by_step[step], rel=1e-5, abs=1e-7), (key, step)
                compared += 1
    assert compared > 50
    assert "stability/proj_norm/layer_00" in full
    for r in ranks:
        # the power-iteration vectors (replicated) and the gradient spike detector (fed the global norm, so
        # identical on every rank) end where the uninterrupted run ends
        assert _diff(r["resumed"]["vectors"], r["full"]["vectors"]) == []
        assert _diff(r["resumed"]["grad_detector"], r["full"]["grad_detector"]) == []
        assert r["stopped_at"] == SpikyLM.spike_step + 1
        assert r["spike"] == 1.0
    # the loss detector is per rank; Lightning restores rank zero's callback state on every rank
    assert _diff(r0["resumed"]["loss_detector"], r0["full"]["loss_detector"]) == []
