"""The diagnosis on real pre-LN and post-LN runs of the demo's smallest preset, and on made-up histories."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from thetascope.cli import main
from thetascope.report.diagnosis import PATHOLOGY_RATIO, diagnose, diagnose_run
from thetascope.report.reader import format_value, load_runs

RUNS = ("pre_ln-no_warmup", "post_ln-no_warmup")


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag")
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--variants", *RUNS, "--no-report"]) == 0
    return out


def _ratios(metrics_csv: Path) -> list[float]:
    with metrics_csv.open(newline="") as fh:
        return [
            float(r["stability/grad/early_late_ratio"])
            for r in csv.DictReader(fh)
            if r.get("stability/grad/early_late_ratio")
        ]


def test_names_post_ln_pathology_on_post_ln_only(demo_runs: Path) -> None:
    runs = {r.name: r for r in load_runs([demo_runs])}
    post, pre = diagnose_run(runs["post_ln-no_warmup"]), diagnose_run(runs["pre_ln-no_warmup"])
    assert post.post_ln_pathology
    assert not pre.post_ln_pathology
    assert "post-LN gradient pathology" in post.text()
    assert "post-LN gradient pathology" not in pre.text()
    # the ratio the row quotes is the logged one (median of the second half), recomputed from the CSV here
    for name, diag in (("post_ln-no_warmup", post), ("pre_ln-no_warmup", pre)):
        ratios = _ratios(demo_runs / name / "metrics.csv")
        median = statistics.median(ratios[len(ratios) // 2 :])
        (row,) = [li for li in diag.lines if "gradient" in li.topic]
        assert f"ratio {format_value(median)} " in row.seen
        assert (median < PATHOLOGY_RATIO) == (name.startswith("post"))


def test_thetascope_report_writes_the_diagnosis(
    demo_runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["report", str(demo_runs), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "rep" / "diagnosis.txt").read_text()
    post = text[text.index("diagnosis of post_ln-no_warmup") :].split("diagnosis of pre_ln")[0]
    pre = text[text.index("diagnosis of pre_ln-no_warmup") :].split("diagnosis of post_ln")[0]
    assert "post-LN gradient pathology" in post
    assert "post-LN gradient pathology" not in pre
    assert "diagnosis of post_ln-no_warmup" in printed
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Diagnosis</h2>" in page
    assert "post-LN gradient pathology" in page


def test_spikes_sharpness_nonfinite_from_numbers() -> None:
    hist = {
        "stability/grad/spike": [(0, 0.0), (10, 1.0), (20, 0.0), (30, 1.0)],
        "stability/grad/spike_count": [(0, 0.0), (10, 1.0), (20, 1.0), (30, 3.0)],
        "stability/loss/spike_count": [(0, 0.0), (10, 0.0), (20, 0.0), (30, 1.0)],
        "stability/curvature/sharpness": [(0, 50.0), (10, 180.0), (20, 210.0)],
        "stability/curvature/threshold": [(0, 200.0), (10, 200.0), (20, 200.0)],
        "stability/grad/nonfinite": [(0, 0.0), (10, 0.0), (20, 2.0)],
    }
    d = diagnose(hist, run="r")
    rows = {li.topic: li for li in d.lines}
    assert set(rows) == {"spikes", "sharpness", "non-finite gradients"}  # no keys, no row
    assert "3 gradient-norm and 1 loss spike(s)" in rows["spikes"].seen
    assert "steps 1-10, steps 21-30" in rows["spikes"].seen
    # sharpness/threshold is computed from the two series when the ratio key is absent: 0.25, 0.9, 1.05
    assert "peak 1.050 at step 20" in rows["sharpness"].seen
    assert "2 of 3 measurements" in rows["sharpness"].seen
    assert rows["sharpness"].status == "warn"
    assert "first seen by step 20" in rows["non-finite gradients"].seen
    assert not diagnose({"train/loss": [(0, 1.0)]}).lines
    # the logged ratio key wins over the recomputation
    only_ratio = diagnose({"stability/curvature/stability_ratio": [(0, 0.2), (5, 0.3)]})
    assert only_ratio.lines[0].status == "ok"
    assert "last 0.300 at step 5" in only_ratio.lines[0].seen
