"""The signal figures in the report: logged APJN profiles and the experiment's profiles file."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.callbacks._models import LM, read_csv_metrics, token_data, trainer
from tests.helpers.threads import single_thread  # noqa: F401  (autouse: one intra-op thread)
from thetascope.callbacks import SignalPropagationMonitor
from thetascope.demo.signal import SignalExperiment, run_signal_experiment
from thetascope.report.html import write_report


def test_experiment_files_and_report_figures(tmp_path: Path) -> None:
    exp = SignalExperiment(
        norms=("pre", "dyt"), depths=(4, 5), seeds=(0, 1), n_embd=16, n_head=2, seq_len=4, batch_size=2,
        n_probes=2, train_steps=0,
    )  # fmt: skip
    summary = run_signal_experiment(tmp_path / "exp", exp, stream=io.StringIO())
    root = tmp_path / "exp/signal"
    with open(root / "profiles.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * (4 + 5)  # norms x attentions x seeds x layers over both depths
    with open(root / "fits.csv") as f:
        assert len(list(csv.DictReader(f))) == exp.n_profiles == 16
    assert json.loads((root / "summary.json").read_text())["groups"] == summary["groups"]
    assert (root / "apjn_vs_depth.png").stat().st_size > 0

    run = tmp_path / "run"
    lm = LM("demo-dyt", n_layer=4, d=16, n_head=2)
    trainer(run, [SignalPropagationMonitor(every_n_steps=2, n_probes=2)], steps=3).fit(lm, token_data(n=8))
    rep = write_report([run, tmp_path / "exp"], tmp_path / "report", stream=io.StringIO())
    figs = {f.key: f for f in rep.figures}
    assert figs["signal_experiment"].path is not None
    assert "Fits at depth 5" in figs["signal_experiment"].caption
    # the mean over seeds (geometric) of the deepest bidirectional DyT profile, layer 1
    vals = [float(r["apjn"]) for r in rows if r["norm"] == "dyt" and r["attention"] == "bidirectional"
            and r["depth"] == "5" and r["layer"] == "1"]  # fmt: skip
    drawn = figs["signal_experiment"].data["bidirectional"]["dyt"]
    assert drawn.values[0] == pytest.approx((vals[0] * vals[1]) ** 0.5)
    logged = read_csv_metrics(run / "csv/version_0/metrics.csv")
    prof = figs["apjn_profile"].data["csv/version_0"]
    assert prof["step 0"].steps == (1, 2, 3, 4)
    assert prof["step 0"].values[3] == pytest.approx(logged["stability/apjn/layer_03"][0])
    assert prof["step 2"].values[0] == pytest.approx(logged["stability/apjn/layer_00"][2])
    page = rep.html_path.read_text()
    assert 'id="signal_experiment"' in page
    assert 'id="apjn_profile"' in page


def test_reports_without_signal_data_are_unchanged(tmp_path: Path) -> None:
    trainer(tmp_path / "run", [], steps=2).fit(LM("demo-pre", n_layer=2, d=16, n_head=2), token_data(n=8))
    rep = write_report([tmp_path / "run"], tmp_path / "report", stream=io.StringIO())
    assert not {"signal_experiment", "apjn_profile"} & {f.key for f in rep.figures}


def test_cli_accepts_the_signal_preset() -> None:
    from thetascope.cli import build_parser

    assert build_parser().parse_args(["demo", "--preset", "signal"]).preset == "signal"
