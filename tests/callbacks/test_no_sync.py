"""Between measurement steps the callbacks never move a tensor value to the host (no device sync)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.callbacks._models import LM, token_data, trainer
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup

_SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
_HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


def test_unmeasured_steps_do_not_read_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside: list[bool] = [False]
    offences: list[str] = []

    for name in _SYNCING:
        original = getattr(torch.Tensor, name)

        def spy(
            self: torch.Tensor, *args: Any, __name: str = name, __orig: Any = original, **kwargs: Any
        ) -> Any:
            if inside[0]:
                offences.append(__name)
            return __orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    cbs = [
        TemperatureWarmup(tau_start=2.0, tau_end=1.0, warmup_steps=100, log=True),
        AttentionSensitivityMonitor(every_n_steps=100),
        GradientFlowMonitor(every_n_steps=100),
    ]
    for cb in cbs:
        for hook in _HOOKS:
            fn = getattr(cb, hook)

            @functools.wraps(fn)
            def wrapped(trainer: Any, *args: Any, __fn: Any = fn, **kwargs: Any) -> Any:
                inside[0] = 0 < trainer.global_step < 100  # step 0 is a measurement step
                try:
                    return __fn(trainer, *args, **kwargs)
                finally:
                    inside[0] = False

            setattr(cb, hook, wrapped)
    trainer(tmp_path, cbs, steps=5, logger=None).fit(LM("demo-pre"), token_data())
    assert offences == []
