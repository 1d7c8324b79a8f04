"""LightningCLI configures all three callbacks from YAML (every argument typed and serialisable)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI

from tests.callbacks._models import LM, token_data
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup

CONFIG = """
trainer:
  max_steps: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  callbacks:
    - class_path: thetascope.TemperatureWarmup
      init_args: {tau_start: 3.0, tau_end: 1.0, warmup_steps: 5, schedule: cosine}
    - class_path: thetascope.callbacks.AttentionSensitivityMonitor
      init_args: {every_n_steps: 1, rows_per_head: 8, layers: auto, prog_bar: true, power_iters: 3}
    - class_path: thetascope.callbacks.GradientFlowMonitor
      init_args: {every_n_steps: 1, spike_action: stop, spike_window: 10, layers: [0, 1], prefix: "diag/"}
model:
  kind: demo-pre
  n_layer: 2
"""


def test_cli_yaml_configures_and_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    cli = LightningCLI(LM, run=False, args=["--config", str(cfg)], save_config_callback=None)
    cbs = {type(cb): cb for cb in cli.trainer.callbacks}
    warm, attn, grad = cbs[TemperatureWarmup], cbs[AttentionSensitivityMonitor], cbs[GradientFlowMonitor]
    assert (warm.schedule.tau_start, warm.schedule.schedule, warm.schedule.warmup_steps) == (3.0, "cosine", 5)
    assert (attn.layers, attn.rows_per_head, attn.prog_bar, attn.power_iters) == ("auto", 8, True, 3)
    assert (grad.layers, grad.spike_action, grad.spike_window, grad.prefix) == ([0, 1], "stop", 10, "diag/")
    cli.trainer.fit(cli.model, token_data(n=16))
    assert "diag/grad_norm_global" in cli.trainer.callback_metrics
    assert "stability/theta_max" in cli.trainer.progress_bar_metrics


def test_cli_rejects_bad_value(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.replace("spike_action: stop", "spike_action: explode"))
    with pytest.raises((SystemExit, ValueError)):
        LightningCLI(LM, run=False, args=["--config", str(cfg)], save_config_callback=None)
