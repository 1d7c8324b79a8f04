"""Resuming from checkpoints that lack what our callbacks wrote: a warning and a clean start, never a crash.

Cases: a checkpoint written by a run without our callbacks; one whose callback state was removed; one whose
callback state has an older (different) layout, made by editing the checkpoint dict.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.reliability._util import (
    LM,
    all_logged_finite,
    callbacks,
    read_csv_metrics,
    recorded_warnings,
    trainer,
)
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup

pytestmark = pytest.mark.reliability

FIRST, TOTAL = 3, 6


def _data() -> Any:
    from tests.reliability._util import token_data

    return token_data(n=16, seq=8, batch_size=2)


def _write_checkpoint(root: Path, cbs: list[Any]) -> Path:
    t = trainer(root, cbs, steps=FIRST, logger=None)
    t.fit(LM("demo-pre", n_layer=2, d=16, n_head=2), _data())
    path = root / "first.ckpt"
    t.save_checkpoint(path)
    return path


def _resume(root: Path, ckpt: Path) -> tuple[list[Any], dict[str, dict[int, float]], list[str]]:
    cbs = callbacks()
    t = trainer(root, cbs, steps=TOTAL)
    with recorded_warnings() as caught:
        t.fit(LM("demo-pre", n_layer=2, d=16, n_head=2), _data(), ckpt_path=ckpt)
    assert t.global_step == TOTAL
    return cbs, read_csv_metrics(root / "csv" / "version_0" / "metrics.csv"), caught


def _check_clean_start(m: dict[str, dict[int, float]], caught: list[str], names: list[str]) -> None:
    assert all_logged_finite(m) == []
    resumed = set(range(FIRST, TOTAL))
    assert set(m["stability/theta_max/layer_01"]) == resumed
    assert set(m["stability/grad_norm/global"]) == resumed
    # counters start from zero, not from garbage
    assert m["stability/grad/nonfinite"][TOTAL - 1] == 0
    for name in names:
        assert any(name in w and "checkpoint" in w for w in caught), f"no warning names {name}: {caught}"


def test_checkpoint_without_our_callbacks(tmp_path: Path) -> None:
    ckpt = _write_checkpoint(tmp_path / "a", [])
    cbs, m, caught = _resume(tmp_path / "b", ckpt)
    _check_clean_start(m, caught, ["AttentionSensitivityMonitor", "GradientFlowMonitor", "TemperatureWarmup"])
    assert (
        cbs[0].temperature == 1.0
    )  # warmup of 4 steps is over at step 6: tau follows the step, not the state


def _edited(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    ckpt = _write_checkpoint(tmp_path / "a", callbacks())
    data = torch.load(ckpt, weights_only=False)
    states = data["callbacks"]
    assert (
        sum(
            k.startswith(("AttentionSensitivityMonitor", "GradientFlowMonitor", "TemperatureWarmup"))
            for k in states
        )
        == 3
    )
    edit(states)
    out = tmp_path / "edited.ckpt"
    torch.save(data, out)
    return out


def test_callback_state_missing(tmp_path: Path) -> None:
    def drop(states: dict[str, Any]) -> None:
        for key in [
            k for k in states if k.startswith(("AttentionSensitivity", "GradientFlow", "TemperatureWarmup"))
        ]:
            del states[key]

    _, m, caught = _resume(tmp_path / "b", _edited(tmp_path, drop))
    _check_clean_start(m, caught, ["AttentionSensitivityMonitor", "GradientFlowMonitor", "TemperatureWarmup"])


def _older_layout(states: dict[str, Any]) -> None:
    """What an earlier version could have written: renamed keys, a list where a dict was, missing fields."""
    for key in list(states):
        if key.startswith("GradientFlowMonitor"):
            states[key] = {"detector": {"buffer": [1.0, 2.0]}, "spikes": 3}
        elif key.startswith("AttentionSensitivityMonitor"):
            states[key] = {"spectral": [torch.ones(3)], "last_step": "two"}
        elif key.startswith("TemperatureWarmup"):
            states[key] = {"schedule": {"tau_start": 4.0}}


def test_callback_state_with_an_older_layout(tmp_path: Path) -> None:
    cbs, m, caught = _resume(tmp_path / "b", _edited(tmp_path, _older_layout))
    _check_clean_start(m, caught, ["AttentionSensitivityMonitor", "GradientFlowMonitor", "TemperatureWarmup"])
    # the warmup kept its own configuration, not a half-read one
    warm = next(c for c in cbs if isinstance(c, TemperatureWarmup))
    assert (warm.schedule.tau_start, warm.schedule.warmup_steps) == (2.0, 4)


@pytest.mark.parametrize("cls", [AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup])
@pytest.mark.parametrize(
    "state", [{}, {"x": 1}, {"grad_detector": None, "spectral": 3, "schedule": "linear"}]
)
def test_load_state_dict_never_raises(cls: type, state: dict[str, Any]) -> None:
    cb = cls()
    with recorded_warnings() as caught:
        cb.load_state_dict(state)
    assert any(cls.__name__ in w for w in caught)
    # and the callback is still in its fresh state: its own state round-trips
    fresh = cls().state_dict()
    assert set(cb.state_dict()) == set(fresh)
