"""``strict=True``: the failures that are warned about and switched off by default raise instead, while
non-finite data (a NaN loss, Inf logits) is still data, counted and never an exception, in both modes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor

from tests.reliability._util import LM, all_logged_finite, callbacks, fit, recorded_warnings
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor
from thetascope.monitors.attention import AttentionMonitor

pytestmark = pytest.mark.reliability


class _Injected(RuntimeError):
    pass


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise _Injected("injected failure")


def _break(cbs: list[Any], monkeypatch: Any) -> None:
    assert any(isinstance(c, AttentionSensitivityMonitor) for c in cbs)
    monkeypatch.setattr(AttentionMonitor, "_spectral", _boom)  # the core behind the callback


def test_default_mode_warns_once_and_goes_on(tmp_path: Path, monkeypatch: Any) -> None:
    cbs = callbacks()
    _break(cbs, monkeypatch)
    with recorded_warnings() as caught:
        t, m = fit(tmp_path, LM("demo-pre", n_layer=2, d=16, n_head=2), cbs, steps=4)
    assert t.global_step == 4
    hits = [w for w in caught if "spectral" in w and "injected failure" in w]
    assert len(hits) == 1, caught  # once, not once per step
    assert "strict=True" in hits[0]
    assert set(m["stability/theta_max/layer_00"]) == {0, 1, 2, 3}  # the rest is still measured
    assert "stability/proj_norm/layer_00" not in m


@pytest.mark.parametrize("target", ["attention", "gradients"])
def test_strict_mode_raises_the_original_error(tmp_path: Path, target: str, monkeypatch: Any) -> None:
    cbs = callbacks(strict=True)
    if target == "attention":
        _break(cbs, monkeypatch)
    else:
        import thetascope.functional.gradients as gradients_mod

        monkeypatch.setattr(gradients_mod, "gradient_pathology", _boom)
    with pytest.raises(_Injected):
        fit(tmp_path, LM("demo-pre", n_layer=2, d=16, n_head=2), cbs, steps=2)


class _NaNLossLM(LM):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.trainer.global_step == 1 else loss


def test_strict_mode_does_not_turn_nonfinite_data_into_errors(tmp_path: Path) -> None:
    cbs = callbacks(strict=True)
    t, m = fit(tmp_path, _NaNLossLM("demo-pre", n_layer=2, d=16, n_head=2), cbs, steps=4)
    assert t.global_step == 4
    assert all_logged_finite(m) == []
    assert m["stability/grad/nonfinite"][3] == 3
    for cb in cbs:
        if isinstance(cb, (AttentionSensitivityMonitor, GradientFlowMonitor)):
            assert cb.guard.disabled == set()
