"""The examples' cores log what the Lightning callbacks log: same model, data and seed, equal values."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from tests.callbacks._models import MemoryLogger, trainer
from thetascope.callbacks import GradientFlowMonitor, TemperatureWarmup

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS, EVERY, SEED = 12, 4, 0
#: the attention keys are compared too
ATTENTION = True


def _load(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Module(pl.LightningModule):
    def __init__(self, plain: ModuleType) -> None:
        super().__init__()
        self.model = plain.make_model(SEED)
        self.vocab = plain.VOCAB

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x).reshape(-1, self.vocab), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.fixture(scope="module")
def lightning_logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float]]:
    plain = _load("plain_pytorch_loop")
    cbs: list[Any] = [
        TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=STEPS // 2),
        GradientFlowMonitor(every_n_steps=EVERY, spike_action="none", log_heatmap=False, strict=True),
    ]
    if ATTENTION:
        from thetascope.callbacks import AttentionSensitivityMonitor

        cbs.append(AttentionSensitivityMonitor(every_n_steps=EVERY, rows_per_head=16, strict=True))
    logger = MemoryLogger()
    data = DataLoader(plain.make_batches(SEED), batch_size=None)
    t = trainer(
        tmp_path_factory.mktemp("lightning"), cbs, steps=STEPS, logger=logger, log_every_n_steps=EVERY
    )
    t.fit(_Module(plain), data)
    return logger.metrics


def _compare(got: dict[int, dict[str, float]], want: dict[str, dict[int, float]]) -> None:
    assert sorted(got) == list(range(0, STEPS, EVERY))
    for step, values in got.items():
        logged_here = {k for k, v in want.items() if step in v}
        assert set(values) == logged_here, step
        for key, value in values.items():
            assert math.isfinite(value)
            assert value == pytest.approx(want[key][step], rel=1e-5, abs=1e-7), (step, key)
    assert any("/layer_01" in k for k in got[0])


def test_plain_loop_logs_what_the_callbacks_log(lightning_logged: dict[str, dict[int, float]]) -> None:
    plain = _load("plain_pytorch_loop")
    model = plain.make_model(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    got = plain.train(
        model, plain.make_batches(SEED), optimizer, steps=STEPS, every=EVERY, monitor_attention=ATTENTION
    )
    _compare(got, lightning_logged)


def test_fabric_loop_logs_what_the_callbacks_log(lightning_logged: dict[str, dict[int, float]]) -> None:
    from lightning.fabric import Fabric

    fabric_loop = _load("fabric_loop")
    fabric = Fabric(accelerator="cpu", devices=1)
    got = fabric_loop.run(fabric, steps=STEPS, every=EVERY, seed=SEED, monitor_attention=ATTENTION)
    _compare(got, lightning_logged)
