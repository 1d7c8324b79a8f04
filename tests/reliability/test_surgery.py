"""Model surgery after the callbacks were attached: a frozen layer, blocks added or removed between fit calls,
the model cast to another dtype between fits and in the middle of one (CPU only)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests.reliability._util import (
    LM,
    all_logged_finite,
    blocks,
    callbacks,
    fit,
    read_csv_metrics,
    token_data,
    trainer,
)
from thetascope.callbacks import GradientFlowMonitor

pytestmark = pytest.mark.reliability

STEPS = 4


def _lm(n_layer: int = 2) -> LM:
    return LM("demo-pre", n_layer=n_layer, d=16, n_head=2)


def _layers_logged(m: dict[str, dict[int, float]], name: str) -> set[int]:
    return {int(k.rsplit("_", 1)[1]) for k in m if k.startswith(f"stability/{name}/layer_")}


def test_frozen_layer_has_no_gradients(tmp_path: Path) -> None:
    model = _lm(3)
    for p in blocks(model)[1].parameters():
        p.requires_grad_(False)
    t, m = fit(tmp_path, model, callbacks(), steps=STEPS)
    assert t.global_step == STEPS
    assert all_logged_finite(m) == []
    assert {0, 2} <= _layers_logged(m, "grad_norm")
    # a frozen layer has no gradient: it is reported as zero or left out, never as NaN or a crash
    assert all(v == 0.0 for v in m.get("stability/grad_norm/layer_01", {}).values())
    # the attention of the frozen layer is still measured (it still runs forward)
    assert set(m["stability/theta_max/layer_01"]) == set(range(STEPS))


def _second_fit(root: Path, model: LM, cbs: list[Any], steps: int) -> dict[str, dict[int, float]]:
    t = trainer(root, cbs, steps=steps)
    t.fit(model, token_data(n=16, seq=8, batch_size=2))
    return read_csv_metrics(root / "csv" / "version_0" / "metrics.csv")


def test_block_added_between_fits_is_measured(tmp_path: Path) -> None:
    model = _lm(2)
    cbs = callbacks()
    fit(tmp_path / "a", model, cbs, steps=STEPS)
    h = blocks(model)
    h.append(copy.deepcopy(h[1]))  # a third block, new parameters
    m = _second_fit(tmp_path / "b", model, cbs, steps=STEPS)
    assert all_logged_finite(m) == []
    steps_b = set(range(STEPS))  # a new Trainer counts from 0 again
    assert set(m["stability/grad_norm/layer_02"]) == steps_b
    assert set(m["stability/theta_max/layer_02"]) == steps_b, "the new attention layer is not measured"


def test_block_removed_between_fits_is_not_reported(tmp_path: Path) -> None:
    model = _lm(3)
    cbs = callbacks()
    fit(tmp_path / "a", model, cbs, steps=STEPS)
    del blocks(model)[2]
    m = _second_fit(tmp_path / "b", model, cbs, steps=STEPS)
    assert all_logged_finite(m) == []
    assert _layers_logged(m, "grad_norm") == {0, 1}
    # a removed layer must not keep reporting its last (stale) measurement
    assert _layers_logged(m, "theta_max") == {0, 1}, "stale values of a removed attention layer were logged"
    assert set(m["stability/theta_max/layer_01"]) == set(range(STEPS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_changed_between_fits(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _lm(2)
    cbs = callbacks()
    fit(tmp_path / "a", model, cbs, steps=STEPS)
    model.to(dtype)
    m = _second_fit(tmp_path / "b", model, cbs, steps=STEPS)
    assert all_logged_finite(m) == []
    steps_b = set(range(STEPS))  # a new Trainer counts from 0 again
    for key in ("theta_max/layer_01", "proj_norm/layer_01", "sensitivity/layer_00", "grad_norm/global"):
        assert set(m[f"stability/{key}"]) == steps_b, key


class _CastMidway(pl.Callback):
    """Cast the module to float64 at the start of optimizer step 2 (SGD without momentum: no state)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == 2:
            pl_module.to(torch.float64)


class _SgdLM(LM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_dtype_changed_in_the_middle_of_fit(tmp_path: Path) -> None:
    model = _SgdLM("demo-pre", n_layer=2, d=16, n_head=2)
    steps = 5
    _, m = fit(tmp_path, model, [_CastMidway(), *callbacks(warmup=10)], steps=steps)
    assert next(model.parameters()).dtype == torch.float64
    assert all_logged_finite(m) == []
    for key in ("theta_max/layer_01", "proj_norm/layer_00", "grad_norm/layer_01", "grad_norm/global"):
        assert set(m[f"stability/{key}"]) == set(range(steps)), key


def test_attention_module_replaced_between_fits(tmp_path: Path) -> None:
    """Swapping an attention module for a new one (same class) measures the new module: its G_l matches an
    SVD of its own weights, not the last value of the module that was removed."""
    model = _lm(2)
    cbs = callbacks()
    fit(tmp_path / "a", model, cbs, steps=STEPS)
    new = copy.deepcopy(blocks(model)[0].attn)
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(3.0)
    blocks(model)[0].attn = new
    d = new.c_proj.weight.shape[0]
    q, k, v = new.c_attn.weight.detach().double().split(d, dim=0)
    want = math.prod(float(torch.linalg.matrix_norm(w, ord=2)) for w in (q, k, v, new.c_proj.weight.double()))
    m = _second_fit(tmp_path / "b", model, cbs, steps=STEPS)
    assert all_logged_finite(m) == []
    assert set(m["stability/theta_max/layer_00"]) == set(range(STEPS))
    assert m["stability/proj_norm/layer_00"][0] == pytest.approx(want, rel=0.05)


class _SkipBlockOne(pl.Callback):
    """Block 1 is skipped (identity) in the forward of optimizer step 2 only, as LayerDrop or early exit."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        block = blocks(pl_module)[1]
        if trainer.global_step == 2:
            block.forward = lambda x: x
        else:
            block.__dict__.pop("forward", None)


def test_layer_skipped_in_one_forward_reports_nothing_stale(tmp_path: Path) -> None:
    _, m = fit(tmp_path, _lm(2), [_SkipBlockOne(), *callbacks()], steps=STEPS)
    assert all_logged_finite(m) == []
    assert set(m["stability/theta_max/layer_00"]) == set(range(STEPS))
    # nothing for layer 1 at step 2 (it did not run), measured again afterwards
    assert set(m["stability/theta_max/layer_01"]) == set(range(STEPS)) - {2}


def test_float64_model_between_measurements(tmp_path: Path) -> None:
    """Unmeasured steps take a cheaper path (the global norm for the spike detector): it must take float64
    gradients too, or the gradient monitor switches itself off."""
    model = _lm(2).to(torch.float64)
    gfm = GradientFlowMonitor(every_n_steps=2, spike_action="none", log_heatmap=False)
    _, m = fit(tmp_path, model, [gfm], steps=STEPS)
    assert gfm.guard.disabled == set()
    assert set(m["stability/grad_norm/global"]) == {0, 2}
    assert m["stability/grad/nonfinite"][2] == 0
