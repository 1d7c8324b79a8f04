"""``log="summary"`` writes only the headline keys; the diagnosis at fit end still reads every value."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.callbacks._models import LM, read_csv_metrics, token_data, trainer
from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor
from thetascope.report.reader import format_value


def test_summary_mode_and_fit_end_diagnosis(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    att = AttentionSensitivityMonitor(every_n_steps=2, log="summary", log_heatmap=False, strict=True)
    grad = GradientFlowMonitor(every_n_steps=2, log="summary", log_heatmap=False, strict=True)
    t = trainer(tmp_path, [att, grad], steps=5)
    with caplog.at_level(logging.INFO):
        t.fit(LM("demo-post", n_layer=3), token_data())
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    logged = {k for k in csv if k.startswith("stability/")}
    assert logged == {"stability/theta_max", "stability/sensitivity_max", "stability/grad_norm_global"}
    assert sorted(csv["stability/grad_norm_global"]) == [0, 2, 4]

    # one diagnosis per fit, shared by both callbacks, from every value (not only the logged headline)
    assert att.diagnosis is not None
    assert att.diagnosis is grad.diagnosis
    assert sum("diagnosis of" in r.getMessage() for r in caplog.records) == 1
    rows = {li.topic: li for li in grad.diagnosis.lines}
    flow = rows.get("gradient flow") or rows["post-LN gradient pathology"]
    last = grad.last_values["stability/grad/early_late_ratio"]
    assert f"{format_value(last)} at step 4" in flow.seen
    assert "theta distribution" in rows
    assert "sensitivity growth" in rows


def test_log_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="log must be one of"):
        GradientFlowMonitor(log="some")
    with pytest.raises(ValueError, match="log must be one of"):
        AttentionSensitivityMonitor(log="everything")
