"""`thetascope demo --preset smoke` end to end in a temp dir: real Trainer, real callbacks, real report.

The report's numbers are recomputed here straight from metrics.csv with the csv module (not the reader).
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from thetascope.cli import main
from thetascope.report.html import write_report
from thetascope.report.reader import FINAL_LOSS_WINDOW, load_runs

pytest.importorskip("matplotlib")

VARIANTS = ["pre_ln-no_warmup", "post_ln-lr_warmup", "post_ln-temp_warmup"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--variants", *VARIANTS]) == 0
    return out


def _columns(path: Path) -> dict[str, list[tuple[int, float]]]:
    cols: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in ("", None):
                    cols.setdefault(k, []).append((int(row["step"]), float(v)))
    return cols


def test_artifacts_exist(demo_dir: Path) -> None:
    for name in VARIANTS:
        assert (demo_dir / name / "metrics.csv").is_file()
        assert list((demo_dir / name / "tb").glob("events.out.tfevents.*"))
    report = demo_dir / "report"
    assert (report / "report.html").is_file()
    for key in (
        "loss",
        "grad_norm_global",
        "theta",
        "grad_profile",
        "proj_norm",
        "sensitivity",
        "temperature",
    ):
        assert (report / f"{key}.png").read_bytes().startswith(b"\x89PNG")


def test_callbacks_logged_the_documented_keys(demo_dir: Path) -> None:
    cols = _columns(demo_dir / "post_ln-temp_warmup" / "metrics.csv")
    for key in (
        "train/loss",
        "val/loss",
        "stability/theta_max/layer_00",
        "stability/theta_max_lower/layer_01",
        "stability/grad_norm/layer_01",
        "stability/grad_norm/global",
        "stability/grad/early_late_ratio",
        "stability/proj_norm/layer_00",
        "stability/sensitivity/layer_00",
        "stability/temperature",
    ):
        assert key in cols, key
    # Temperature warmup: geometric 4 -> 1, logged against the optimizer step.
    temps = [v for _, v in sorted(cols["stability/temperature"])]
    assert temps[0] == pytest.approx(4.0, rel=0.2)
    assert temps[-1] == pytest.approx(1.0)
    # Runs without temperature warmup report tau = 1 (the attention monitor logs the tau it measured under).
    other = _columns(demo_dir / "pre_ln-no_warmup" / "metrics.csv").get("stability/temperature", [(0, 1.0)])
    assert {v for _, v in other} == {1.0}


def test_findings_equal_values_recomputed_from_csv(demo_dir: Path) -> None:
    rep = write_report([demo_dir / v for v in VARIANTS], demo_dir / "report2")
    for f in rep.findings:
        cols = _columns(demo_dir / f.run / "metrics.csv")
        losses = [v for _, v in cols["train/loss"]]
        tail = losses[-FINAL_LOSS_WINDOW:]
        assert f.final_train_loss == pytest.approx(sum(tail) / len(tail))
        thetas = [
            v for k, s in cols.items() if re.fullmatch(r"stability/theta_max/layer_\d+", k) for _, v in s
        ]
        assert f.median_theta_max == pytest.approx(statistics.median(thetas))
        ratios = [v for _, v in cols["stability/grad/early_late_ratio"]]
        assert f.early_late_ratio == pytest.approx(statistics.median(ratios))
        assert f.grad_spikes == int(max(v for _, v in cols["stability/grad/spike_count"]))
        assert f.final_val_loss == pytest.approx(cols["val/loss"][-1][1])
        assert f.median_theta_max is not None
        assert 0.0 <= f.median_theta_max <= 1.0
        assert f.final_train_loss is not None
        assert math.isfinite(f.final_train_loss)
    by_key = {fig.key: fig for fig in rep.figures}
    for fig in rep.figures:
        assert fig.path is not None, fig.key
        assert fig.data, fig.key
    cols = _columns(demo_dir / "pre_ln-no_warmup" / "metrics.csv")
    drawn = by_key["theta"].data["pre_ln-no_warmup"]["theta_max/layer_01"]
    assert list(zip(drawn.steps, drawn.values)) == cols["stability/theta_max/layer_01"]
    temps = by_key["temperature"].data["post_ln-temp_warmup"]["temperature"].values
    assert temps[0] > 2.0
    assert temps[-1] == pytest.approx(1.0)
    # The findings table in the HTML shows the same numbers.
    page = rep.html_path.read_text()
    assert f"{rep.findings[0].final_train_loss:.3f}" in page


def test_tensorboard_events_alone_give_the_same_scalars(demo_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    shutil.copytree(demo_dir / "pre_ln-no_warmup" / "tb", tmp_path / "tb_only")
    (tb_run,) = load_runs([tmp_path / "tb_only"])
    (csv_run,) = load_runs([demo_dir / "pre_ln-no_warmup"])
    assert set(tb_run.scalars) >= {"train/loss", "theta_max/layer_00", "grad_norm/global"}
    for key in ("train/loss", "theta_max/layer_00", "grad_norm/global"):
        assert tb_run.scalars[key].steps == csv_run.scalars[key].steps
        assert tb_run.scalars[key].values == pytest.approx(csv_run.scalars[key].values, rel=1e-6)


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(demo_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "screenshot_report.py"),
            str(demo_dir / "report" / "report.html"),
            "--png",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes().startswith(b"\x89PNG")


def test_steps_override_below_the_validation_interval(tmp_path: Path) -> None:
    args = ["demo", "--preset", "smoke", "--steps", "3", "--variants", "post_ln-path_length", "--no-report"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    with (tmp_path / "post_ln-path_length" / "metrics.csv").open(newline="") as fh:
        steps = {int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")}
    assert steps == {0, 1, 2}
    assert not (tmp_path / "report").exists()
