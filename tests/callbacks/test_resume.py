"""Checkpoint round trip of all three callbacks: 30 steps + resume to 60 equals 60 uninterrupted steps."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.callbacks._models import LM, MemoryLogger, token_data, trainer
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup


def _callbacks() -> tuple[TemperatureWarmup, AttentionSensitivityMonitor, GradientFlowMonitor]:
    return (
        TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=40, schedule="cosine"),
        AttentionSensitivityMonitor(every_n_steps=10, rows_per_head=8, strict=True),
        GradientFlowMonitor(every_n_steps=10, spike_window=8, spike_action="none", strict=True),
    )


def _run(root: Path, steps: int, ckpt: str | None = None) -> tuple[dict[str, dict[int, float]], tuple]:
    cbs = _callbacks()
    logger = MemoryLogger()
    t = trainer(root, list(cbs), steps=steps, logger=logger)
    # every batch identical: Lightning restarts a plain DataLoader's iterator on a mid-epoch resume
    t.fit(LM("demo-pre", d=16, n_head=2), token_data(n=8, batch_size=8, repeat=100), ckpt_path=ckpt)
    if ckpt is None and steps == 30:
        t.save_checkpoint(root / "step30.ckpt")
    return logger.metrics, cbs


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full, full_cbs = _run(tmp_path / "full", 60)
    _run(tmp_path / "first", 30)
    second, resumed_cbs = _run(tmp_path / "second", 60, str(tmp_path / "first/step30.ckpt"))

    keys = [k for k in full if k.startswith("stability/")]
    assert "stability/temperature" in keys
    assert "stability/proj_norm/layer_01" in keys
    assert "stability/grad_norm/global" in keys
    for key in keys:
        want = {s: v for s, v in full[key].items() if s >= 30}
        assert set(second[key]) == set(want), key
        for step, value in want.items():
            assert abs(second[key][step] - value) <= 1e-5 * max(1.0, abs(value)), (key, step)
    assert set(full["stability/proj_norm/layer_00"]) == {0, 10, 20, 30, 40, 50}

    # restored state: spike statistics and power-iteration vectors end up identical
    g_full, g_res = full_cbs[2].state_dict(), resumed_cbs[2].state_dict()
    torch.testing.assert_close(g_res["grad_detector"]["buffer"], g_full["grad_detector"]["buffer"])
    assert g_res["grad_detector"]["n_seen"] == g_full["grad_detector"]["n_seen"] == 60
    v_full = full_cbs[1].state_dict()["spectral"]["vectors"]
    v_res = resumed_cbs[1].state_dict()["spectral"]["vectors"]
    assert v_full
    assert set(v_full) == set(v_res)
    for k in v_full:
        torch.testing.assert_close(v_res[k], v_full[k], rtol=1e-4, atol=1e-5)


def test_state_dict_is_plain_data_and_loads_into_fresh_instances() -> None:
    _, mon, grad = _callbacks()
    grad.grad_detector.update(torch.tensor(1.0))
    for cb in (mon, grad):
        state = cb.state_dict()
        fresh = type(cb)(every_n_steps=10)
        fresh.load_state_dict(state)
        assert fresh.state_dict().keys() == state.keys()
    assert grad.state_dict()["grad_detector"]["n_seen"] == 1
