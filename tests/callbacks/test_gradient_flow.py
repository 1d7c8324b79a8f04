"""GradientFlowMonitor on real Trainers, against per-parameter norms computed by hand."""

from __future__ import annotations

import math
import re
import types
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import Tensor

from tests.callbacks._models import LM, TwoOptLM, read_csv_metrics, read_tb_scalars, token_data, trainer
from thetascope.callbacks import GradientFlowMonitor

_LAYER = re.compile(r"\.h\.(\d+)\.")


class _RefNorms(Callback):
    """Independent reference: per-layer and global gradient norms, one ``vector_norm`` per parameter."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[dict[int, float], float]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        sq: dict[int, float] = {}
        total = 0.0
        for name, p in pl_module.named_parameters():
            if id(p) not in params or p.grad is None:
                continue
            v = float(torch.linalg.vector_norm(p.grad.double())) ** 2
            total += v
            m = _LAYER.search(name)
            if m:
                sq[int(m.group(1))] = sq.get(int(m.group(1)), 0.0) + v
        self.at[trainer.global_step] = ({k: math.sqrt(v) for k, v in sq.items()}, math.sqrt(total))


def test_keys_and_values_at_measurement_steps_csv_and_tensorboard(tmp_path: Path) -> None:
    mon = GradientFlowMonitor(every_n_steps=2, strict=True)
    ref = _RefNorms()
    t = trainer(tmp_path, [mon, ref], steps=7, logger="both")
    t.fit(LM("demo-pre", n_layer=3), token_data())
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    tb, images = read_tb_scalars(tmp_path / "tb/version_0")
    expected_steps = {0, 2, 4, 6}
    keys = [f"stability/grad_norm/layer_{i:02d}" for i in range(3)] + [
        "stability/grad_norm/global",
        "stability/grad_norm_global",
        "stability/grad/early_late_ratio",
        "stability/grad/log_slope",
        "stability/grad/vanishing_layers",
        "stability/grad/min_max_ratio",
        "stability/grad/spike",
        "stability/grad/spike_count",
        "stability/loss/spike_count",
        "stability/grad/nonfinite",
    ]
    for key in keys:
        assert set(csv[key]) == expected_steps, key
        assert set(tb[key]) == expected_steps, key
    for step in expected_steps:
        layer_ref, global_ref = ref.at[step]
        assert csv["stability/grad_norm/global"][step] == pytest.approx(global_ref, rel=1e-5)
        assert tb["stability/grad_norm_global"][step] == pytest.approx(global_ref, rel=1e-5)
        for i in range(3):
            assert csv[f"stability/grad_norm/layer_{i:02d}"][step] == pytest.approx(layer_ref[i], rel=1e-5)
        lr = [layer_ref[i] for i in range(3)]
        assert csv["stability/grad/min_max_ratio"][step] == pytest.approx(min(lr) / max(lr), rel=1e-4)
    assert "stability/grad_norm/heatmap" in images
    assert float(t.callback_metrics["stability/grad_norm_global"]) == pytest.approx(ref.at[6][1], rel=1e-5)


def test_accumulation_measures_only_optimizer_steps(tmp_path: Path) -> None:
    calls: list[int] = []

    class _Spy(GradientFlowMonitor):
        def measure(self, trainer: pl.Trainer, step: int, *args: Any) -> dict[str, float]:
            calls.append(step)
            return super().measure(trainer, step, *args)

    mon = _Spy(every_n_steps=1, strict=True)
    ref = _RefNorms()
    t = trainer(tmp_path, [mon, ref], steps=3, accumulate_grad_batches=4)
    t.fit(LM("demo-pre"), token_data())
    assert calls == [0, 1, 2]  # 12 micro-batches, 3 optimizer steps
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    assert set(csv["stability/grad_norm/global"]) == {0, 1, 2}
    for step in range(3):
        assert csv["stability/grad_norm/global"][step] == pytest.approx(ref.at[step][1], rel=1e-5)


def test_layers_auto_subset_and_no_logger(tmp_path: Path) -> None:
    mon = GradientFlowMonitor(every_n_steps=1, layers="auto", strict=True)
    t = trainer(tmp_path, [mon], steps=1, logger=None)
    t.fit(LM("demo-pre", n_layer=6), token_data())
    per_layer = sorted(k for k in mon.last_values if k.startswith("stability/grad_norm/layer_"))
    assert per_layer == [f"stability/grad_norm/layer_{i:02d}" for i in (0, 1, 3, 4, 5)]
    assert "stability/grad/early_late_ratio" in mon.last_values


def test_fp16_mixed_norms_are_unscaled(tmp_path: Path) -> None:
    fp32 = GradientFlowMonitor(every_n_steps=1, strict=True)
    trainer(tmp_path / "a", [fp32], steps=1, logger=None).fit(LM("demo-pre"), token_data())
    from lightning.pytorch.plugins import MixedPrecision

    amp = GradientFlowMonitor(every_n_steps=1, strict=True)
    # Trainer(precision="16-mixed") silently becomes bf16 on CPU; an explicit plugin keeps fp16 + GradScaler
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    t = trainer(tmp_path / "b", [amp], steps=1, logger=None, plugins=[plugin])
    t.fit(LM("demo-pre"), token_data())
    scaler = getattr(t.precision_plugin, "scaler", None)
    assert scaler is not None
    assert scaler.get_scale() > 1000.0  # the loss really was scaled
    got = amp.last_values["stability/grad_norm/global"]
    want = fp32.last_values["stability/grad_norm/global"]
    assert got == pytest.approx(want, rel=0.05)  # unscaled: fp16 rounding only, not a factor 65536


def test_bf16_mixed(tmp_path: Path) -> None:
    mon = GradientFlowMonitor(every_n_steps=2, strict=True)
    ref = _RefNorms()
    trainer(tmp_path, [mon, ref], steps=3, logger=None, precision="bf16-mixed").fit(
        LM("demo-pre"), token_data()
    )
    assert mon.last_values["stability/grad_norm/global"] == pytest.approx(ref.at[2][1], rel=1e-4)


def test_two_optimizers_measure_the_stepped_one(tmp_path: Path) -> None:
    mon = GradientFlowMonitor(every_n_steps=3, strict=True)
    ref = _RefNorms()
    t = trainer(tmp_path, [mon, ref], steps=8, logger="csv")
    t.fit(TwoOptLM(kind="demo-pre"), token_data())
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    # global_step counts both optimizers' steps: even steps are opt A (no block params), odd are opt B
    assert set(csv["stability/grad_norm/global"]) == {0, 3, 6}
    for step in (0, 3, 6):
        assert csv["stability/grad_norm/global"][step] == pytest.approx(ref.at[step][1], rel=1e-5)
    assert 3 in csv["stability/grad_norm/layer_00"]
    assert 0 not in csv["stability/grad_norm/layer_00"]
    assert csv["stability/grad_norm/layer_01"][3] == pytest.approx(ref.at[3][0][1], rel=1e-5)


class _SpikyLM(LM):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (1e4 if self.trainer.global_step == 12 else 1.0)


def test_spike_stop_is_agreed_and_latency_bounded(tmp_path: Path) -> None:
    mon = GradientFlowMonitor(every_n_steps=5, spike_action="stop", spike_window=10, strict=True)
    t = trainer(tmp_path, [mon], steps=40)
    with pytest.warns(UserWarning, match="stopping training"):
        t.fit(_SpikyLM("demo-pre"), token_data(n=256))
    assert t.global_step == 16  # spike at step 12, read at the next measurement (15), stop after that step
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    assert csv["stability/grad/spike"] == {0: 0.0, 5: 0.0, 10: 0.0, 15: 1.0}
    assert csv["stability/grad/spike_count"][15] >= 1.0
    assert csv["stability/loss/spike_count"][15] >= 1.0
    state = mon.state_dict()
    assert isinstance(state["grad_spike_count"], int)
    assert state["grad_spike_count"] >= 1


def test_early_stopping_monitors_headline(tmp_path: Path) -> None:
    mon = GradientFlowMonitor(every_n_steps=1)
    stop = EarlyStopping(
        monitor="stability/grad_norm_global",
        mode="min",
        divergence_threshold=1e-9,
        check_on_train_epoch_end=True,
    )
    t = trainer(tmp_path, [mon, stop], steps=20, logger=None)
    t.fit(LM("demo-pre"), token_data(n=8))  # 2 batches per epoch
    assert t.global_step == 2  # stopped at the first epoch end: the key was in callback_metrics


def test_failure_warns_once_and_disables(tmp_path: Path) -> None:
    mon = GradientFlowMonitor(every_n_steps=1)

    def boom(value: Tensor) -> Tensor:
        raise RuntimeError("detector exploded")

    mon.grad_detector.push = boom  # type: ignore[method-assign]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [mon], steps=4, logger=None).fit(LM("demo-pre"), token_data())
    msgs = [str(w.message) for w in caught if "detector exploded" in str(w.message)]
    assert len(msgs) == 1
    assert "grad_spike" in msgs[0]
    assert not mon.guard.active("grad_spike")
    assert "stability/grad_norm/global" in mon.last_values  # the rest still measured

    strict = GradientFlowMonitor(every_n_steps=1, strict=True)
    strict.grad_detector.push = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="detector exploded"):
        trainer(tmp_path, [strict], steps=2, logger=None).fit(LM("demo-pre"), token_data())


def test_sharded_strategy_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    fake = types.SimpleNamespace(strategy=FSDPStrategy(), global_rank=0)
    with pytest.raises(RuntimeError, match=r"FSDPStrategy.*shard"):
        GradientFlowMonitor().setup(fake, LM("demo-pre"), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"spike_action": "halt"}, "spike_action"),
        ({"spike_window": 2}, "spike_window"),
        ({"spike_threshold": -1.0}, "spike_threshold"),
        ({"vanishing_fraction": 1.5}, "vanishing_fraction"),
        ({"layers": "some"}, "layers"),
        ({"strict": "yes"}, "strict"),
    ],
)
def test_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GradientFlowMonitor(**kwargs)


def test_state_key_distinguishes_instances() -> None:
    a, b = GradientFlowMonitor(every_n_steps=10), GradientFlowMonitor(every_n_steps=20)
    assert a.state_key != b.state_key
