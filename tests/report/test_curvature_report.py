"""Curvature figures from a real logged run: drawn with the logged values; absent without the monitor."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.callbacks._models import LM, read_csv_metrics, token_data, trainer
from tests.helpers.threads import single_thread
from tests.report.test_reader import synthetic_rows, write_csv
from thetascope.callbacks import CurvatureMonitor
from thetascope.report.html import write_report

pytest.importorskip("matplotlib")
__all__ = ["single_thread"]


def test_curvature_figures_show_the_logged_values(tmp_path: Path) -> None:
    cb = CurvatureMonitor(every_n_steps=2, iters=4, trace_samples=2, strict=True)
    trainer(tmp_path, [cb], steps=6, logger="csv").fit(LM("demo-pre", d=16, n_head=2), token_data(n=32))
    run = tmp_path / "csv" / "version_0"
    logged = read_csv_metrics(run / "metrics.csv")
    rep = write_report([run], tmp_path / "out")
    figs = {f.key: f for f in rep.figures}
    for key in ("curvature_sharpness", "curvature_traces", "curvature_taylor"):
        path = figs[key].path
        assert path is not None, key
        assert path.exists(), key
    (data,) = figs["curvature_sharpness"].data.values()
    sharp = data["curvature/precond_sharpness"]  # AdamW: the preconditioned value is the compared one
    assert dict(zip(sharp.steps, sharp.values)) == pytest.approx(
        logged["stability/curvature/precond_sharpness"]
    )
    (taylor,) = figs["curvature_taylor"].data.values()
    obs = taylor["curvature/loss_change"]
    assert dict(zip(obs.steps, obs.values)) == pytest.approx(logged["stability/curvature/loss_change"])
    (traces,) = figs["curvature_traces"].data.values()
    assert {"curvature/trace_type/attn_q", "curvature/trace_type/ffn"} <= set(traces)
    assert 'id="curvature_sharpness"' in rep.html_path.read_text()


def test_no_curvature_figures_without_the_monitor(tmp_path: Path) -> None:
    write_csv(tmp_path / "run" / "metrics.csv", synthetic_rows())
    rep = write_report([tmp_path / "run"], tmp_path / "out")
    assert not [f for f in rep.figures if f.key.startswith("curvature")]
    assert not [n for n in rep.notes if "curvature" in n]
