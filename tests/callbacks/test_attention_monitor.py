"""AttentionSensitivityMonitor on real Trainers and real models, against materialised attention and SVD."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from tests.callbacks._models import (
    LM,
    demo_reference,
    exhaustive_theta,
    read_csv_metrics,
    read_tb_scalars,
    token_data,
    trainer,
)
from thetascope.callbacks import AttentionSensitivityMonitor, TemperatureWarmup
from thetascope.keys import layer_key
from thetascope.monitors.attention import AttentionMonitor

PER_LAYER = (
    "theta_max",
    "theta_max_lower",
    "theta_mean",
    "theta_frac_099",
    "theta_p10",
    "theta_width",
    "entropy",
    "attn_input_max_norm",
    "residual_max_norm",
    "proj_norm",
    "sensitivity",
    "lipschitz_bound",
    "nonfinite_rows",
)


class _Reference(Callback):
    """Before the measured forward of step 0: materialised attention and exact (SVD) spectral norms."""

    def __init__(self) -> None:
        self.ref: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        if trainer.global_step != 0 or self.ref:
            return
        gpt = pl_module.model
        cfg = gpt.config
        for layer, block in zip(demo_reference(gpt, batch[0]), gpt.transformer["h"]):
            w_q, w_k, w_v = block.attn.c_attn.weight.detach().split(cfg.n_embd, dim=0)
            w_o = block.attn.c_proj.weight.detach()

            def norm2(w: torch.Tensor) -> torch.Tensor:
                return torch.linalg.matrix_norm(w.double(), ord=2)

            per_head = [w.reshape(cfg.n_head, cfg.head_dim, -1) for w in (w_q, w_k, w_v)]
            qh, kh, vh = (norm2(w) for w in per_head)
            theta = exhaustive_theta(layer["probs"])  # [B, H, L]
            b_bar = layer["attn_input"].double().norm(dim=-1).max()
            theta_h = theta.amax(dim=(0, 2))
            bound = norm2(w_o) * (vh + theta_h * 2 * b_bar**2 / math.sqrt(cfg.head_dim) * qh * kh * vh).sum()
            p = layer["probs"].double()
            entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
            g = norm2(w_q) * norm2(w_k) * norm2(w_v) * norm2(w_o)
            self.ref.append(
                {
                    "theta": theta,
                    "entropy": float(entropy.mean()),
                    "attn_input_max_norm": float(b_bar),
                    "residual_max_norm": float(layer["residual"].double().norm(dim=-1).max()),
                    "proj_norm": float(g),
                    "lipschitz_bound": float(bound),
                    "sensitivity": float(theta.max() * b_bar**2 * g),
                }
            )


def test_values_match_materialised_attention_and_svd(tmp_path: Path) -> None:
    mon = AttentionSensitivityMonitor(every_n_steps=2, rows_per_head=64, strict=True)
    ref = _Reference()
    t = trainer(tmp_path, [ref, mon], steps=5, logger="both")
    model = LM("demo-pre", n_layer=2)
    with torch.no_grad():  # sharper attention than at init, so theta is spread out
        for block in model.model.transformer["h"]:
            block.attn.c_attn.weight.mul_(15.0)
    t.fit(model, token_data())
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    tb, images = read_tb_scalars(tmp_path / "tb/version_0")
    for i in range(2):
        for name in PER_LAYER:
            key = f"stability/{name}/layer_{i:02d}"
            assert set(csv[key]) == {0, 2, 4}, key
            assert set(tb[key]) == {0, 2, 4}, key
    for key in ("stability/theta_max", "stability/sensitivity_max", "stability/temperature"):
        assert set(csv[key]) == {0, 2, 4}, key
    assert {"stability/theta_max/heatmap", "stability/sensitivity/heatmap"} <= set(images)

    for i, r in enumerate(ref.ref):
        got = {name: csv[f"stability/{name}/layer_{i:02d}"][0] for name in PER_LAYER}
        exact_max = float(r["theta"].max())
        assert got["theta_max_lower"] - 1e-6 <= exact_max <= got["theta_max"] + 1e-6  # the bracket holds
        assert got["theta_max"] - got["theta_max_lower"] <= got["theta_width"] + 1e-6
        assert got["theta_mean"] == pytest.approx(float(r["theta"].mean()), abs=2 * got["theta_width"] + 1e-6)
        assert got["theta_frac_099"] <= float((r["theta"] >= 0.99 - 1e-9).double().mean()) + 1e-9
        assert got["theta_p10"] == pytest.approx(float(r["theta"].reshape(-1).quantile(0.1)), abs=0.02)
        assert got["entropy"] == pytest.approx(r["entropy"], rel=1e-4)
        assert got["attn_input_max_norm"] == pytest.approx(r["attn_input_max_norm"], rel=1e-5)
        assert got["residual_max_norm"] == pytest.approx(r["residual_max_norm"], rel=1e-5)
        assert got["proj_norm"] == pytest.approx(r["proj_norm"], rel=2e-2)  # power iteration vs SVD
        assert got["lipschitz_bound"] == pytest.approx(r["lipschitz_bound"], rel=5e-2)
        # S_l = theta_max / tau * B^2 * G with B = attn_input_max_norm (tau = 1 here)
        assert got["sensitivity"] == pytest.approx(
            got["theta_max"] * got["attn_input_max_norm"] ** 2 * got["proj_norm"], rel=1e-5
        )
        assert got["sensitivity"] == pytest.approx(r["sensitivity"], rel=3e-2)
        assert got["nonfinite_rows"] == 0.0
    assert csv["stability/theta_max"][0] == max(
        csv[f"stability/theta_max/layer_{i:02d}"][0] for i in range(2)
    )
    assert float(t.callback_metrics["stability/sensitivity_max"]) == pytest.approx(
        csv["stability/sensitivity_max"][4]
    )


@pytest.mark.parametrize("kind", ["torch-pre", "torch-post", "gpt2", "lightning"])
def test_real_models(tmp_path: Path, kind: str) -> None:
    mon = AttentionSensitivityMonitor(every_n_steps=2, rows_per_head=8, strict=True)
    t = trainer(tmp_path, [mon], steps=3, logger=None)
    t.fit(LM(kind), token_data(n=16))
    n = 6 if kind == "lightning" else 2  # nn.Transformer: encoder self, decoder self and cross attention
    # nn.Transformer: two layers in each of the encoder, decoder and decoder_cross stacks
    where = [(s, i) for s in ("encoder", "decoder", "decoder_cross") for i in range(2)]
    for stack, i in where if kind == "lightning" else [(None, i) for i in range(n)]:
        for name in ("theta_max", "attn_input_max_norm", "proj_norm", "sensitivity", "lipschitz_bound"):
            value = mon.last_values[layer_key("stability/", name, i, stack=stack)]
            assert math.isfinite(value)
            assert value >= 0.0
    card = mon.architecture_card()
    assert card["depth"] == n
    if kind != "lightning":
        assert card["norm_placement"] == ("post" if kind == "torch-post" else "pre")
    assert card["recommended_scale"] == pytest.approx(n ** (-1 / 4))


def test_compiled_module_is_measured_eagerly(tmp_path: Path) -> None:
    plain = AttentionSensitivityMonitor(every_n_steps=2, strict=True)
    trainer(tmp_path / "a", [plain], steps=3, logger=None).fit(LM("demo-pre"), token_data())
    comp = AttentionSensitivityMonitor(every_n_steps=2, strict=True)
    trainer(tmp_path / "b", [comp], steps=3, logger=None).fit(LM("demo-pre", compile=True), token_data())
    for key in ("stability/theta_max/layer_01", "stability/attn_input_max_norm/layer_00"):
        assert comp.last_values[key] == pytest.approx(plain.last_values[key], rel=1e-3)


def test_early_stopping_and_prog_bar_on_headline(tmp_path: Path) -> None:
    mon = AttentionSensitivityMonitor(every_n_steps=1, prog_bar=True, layers="auto")
    stop = EarlyStopping(
        monitor="stability/theta_max", mode="min", divergence_threshold=1e-9, check_on_train_epoch_end=True
    )
    t = trainer(tmp_path, [mon, stop], steps=20, logger=None)
    t.fit(LM("demo-pre", n_layer=6), token_data(n=8))
    assert t.global_step == 2  # stopped at the first epoch end: the headline was in callback_metrics
    assert "stability/theta_max" in t.progress_bar_metrics
    per_layer = sorted({k.rsplit("/", 1)[1] for k in mon.last_values if "/layer_" in k})
    assert per_layer == ["layer_00", "layer_01", "layer_03", "layer_04", "layer_05"]


def test_temperature_is_used_and_logged_once(tmp_path: Path) -> None:
    warm = TemperatureWarmup(tau_start=2.0, tau_end=1.0, warmup_steps=10)
    mon = AttentionSensitivityMonitor(every_n_steps=2, strict=True)
    t = trainer(tmp_path, [warm, mon], steps=3)
    t.fit(LM("demo-pre"), token_data())
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    tau = warm.tau_at(2)
    v = {
        n: csv[f"stability/{n}/layer_00"][2]
        for n in ("sensitivity", "theta_max", "attn_input_max_norm", "proj_norm")
    }
    assert v["sensitivity"] == pytest.approx(
        v["theta_max"] / tau * v["attn_input_max_norm"] ** 2 * v["proj_norm"], rel=1e-5
    )
    assert csv["stability/temperature"] == pytest.approx({0: 2.0, 1: warm.tau_at(1), 2: tau})
    assert warm.probe is mon.probe  # one probe, one set of hooks


def test_failure_in_one_layer_warns_once_and_keeps_others(tmp_path: Path, monkeypatch: Any) -> None:
    mon = AttentionSensitivityMonitor(every_n_steps=1)
    original = AttentionMonitor._layer_stats

    def flaky(self: AttentionMonitor, rec: Any) -> dict[str, torch.Tensor]:
        if rec.index == 1:
            raise RuntimeError("synthetic failure")
        return original(self, rec)

    monkeypatch.setattr(AttentionMonitor, "_layer_stats", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [mon], steps=3, logger=None).fit(LM("demo-pre"), token_data())
    msgs = [str(w.message) for w in caught if "synthetic failure" in str(w.message)]
    assert len(msgs) == 1
    assert "layer_01" in msgs[0]
    assert "stability/theta_max/layer_00" in mon.last_values
    assert not any("layer_01" in k for k in mon.last_values)
    assert all(math.isfinite(v) for v in mon.last_values.values())

    strict = AttentionSensitivityMonitor(every_n_steps=1, strict=True)
    with pytest.raises(RuntimeError, match="synthetic failure"):
        trainer(tmp_path, [strict], steps=1, logger=None).fit(LM("demo-pre"), token_data())


def test_no_hooks_between_measurements(tmp_path: Path) -> None:
    mon = AttentionSensitivityMonitor(every_n_steps=3, strict=True)
    installed: list[tuple[int, bool]] = []

    class _Spy(Callback):
        def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
            installed.append((trainer.global_step, mon.probe.is_installed))

    trainer(tmp_path, [mon, _Spy()], steps=5, logger=None).fit(LM("demo-pre"), token_data())
    assert installed == [(s, False) for s in range(5)]  # capture closed before backward, never open otherwise


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"rows_per_head": 0}, "rows_per_head"),
        ({"exact_top": 50}, "exact_top"),
        ({"layers": [-1]}, "layers"),
        ({"batch_size": 0}, "batch_size"),
        ({"power_iters": 0}, "power_iters"),
        ({"prefix": 3}, "prefix"),
        ({"prog_bar": "no"}, "prog_bar"),
    ],
)
def test_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AttentionSensitivityMonitor(**kwargs)


def test_accumulation_captures_once_per_optimizer_step(tmp_path: Path) -> None:
    mon = AttentionSensitivityMonitor(every_n_steps=2, strict=True)
    steps: list[int] = []
    original = mon.measure

    def spy(trainer: pl.Trainer, step: int) -> dict[str, float]:
        steps.append(step)
        return original(trainer, step)

    mon.measure = spy  # type: ignore[method-assign]
    trainer(tmp_path, [mon], steps=5, logger=None, accumulate_grad_batches=3).fit(
        LM("demo-pre"), token_data()
    )
    assert steps == [0, 2, 4]  # 15 micro-batches; one capture on each measured optimizer step
