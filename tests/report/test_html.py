"""The report page and figures from synthetic logs: partial runs, escaping, embedded images, CLI exits."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from tests.report.test_reader import synthetic_rows, write_csv
from thetascope.cli import main
from thetascope.report.html import write_report

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _imgs(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def test_full_synthetic_run_draws_every_figure_with_the_logged_values(tmp_path: Path) -> None:
    rows = synthetic_rows()
    write_csv(tmp_path / "runA" / "metrics.csv", rows)
    rows_t = [*rows, *({"step": s, "stability/temperature": 4.0 * 0.5**s} for s in range(3))]
    write_csv(tmp_path / "runB" / "metrics.csv", rows_t)
    rep = write_report([tmp_path / "runA", tmp_path / "runB"], tmp_path / "out")
    by_key = {f.key: f for f in rep.figures}
    drawn = [f for f in rep.figures if f.path is not None]
    assert [f.key for f in drawn] == [
        "loss",
        "grad_norm_global",
        "theta",
        "grad_profile",
        "proj_norm",
        "sensitivity",
        "temperature",
    ]
    for f in drawn:
        assert f.path is not None
        assert f.path.read_bytes().startswith(PNG_MAGIC)
        assert f.data
        assert all(len(s) > 0 for series in f.data.values() for s in series.values())
    # Values drawn are the values logged.
    losses = tuple(r["train/loss"] for r in rows if "train/loss" in r)
    assert by_key["loss"].data["runA"]["train/loss"].values == losses
    assert by_key["grad_norm_global"].data["runA"]["spikes"].steps == (15,)
    assert by_key["theta"].data["runA"]["theta_max_lower/layer_02"].values[0] == pytest.approx(0.91)
    # Profile: median of each layer's second half of measurements (steps 20..35 -> 1+step in 21..36).
    late = by_key["grad_profile"].data["runA"]["late median"]
    assert late.steps == (0, 1, 2)
    assert late.values[0] == pytest.approx(0.1 * (1 + 27.5))
    assert by_key["temperature"].data == {"runB": by_key["temperature"].data["runB"]}
    assert by_key["temperature"].data["runB"]["temperature"].values == (4.0, 2.0, 1.0)
    page = rep.html_path.read_text()
    srcs = _imgs(page)
    assert len(srcs) == len(drawn)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page.lower()
    assert 'id="findings"' in page


def test_partial_run_draws_what_it_can_and_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"step": s, "train/loss": 3.0 - 0.01 * s, "stability/grad_norm/global": 1.0 + s} for s in range(30)
    ]
    write_csv(tmp_path / "partial" / "metrics.csv", rows)
    rep = write_report([tmp_path / "partial"], tmp_path / "out")
    drawn = {f.key for f in rep.figures if f.path is not None}
    assert drawn == {"loss", "grad_norm_global"}
    err = capsys.readouterr().err
    assert "theta" in err
    assert "not drawn" in err
    page = rep.html_path.read_text()
    assert "Missing data" in page
    assert "no theta_max/layer_XX keys" in page
    assert rep.findings[0].median_theta_max is None
    assert len(_imgs(page)) == 2


def test_strings_from_logs_are_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    run_dir = tmp_path / evil
    write_csv(
        run_dir / "metrics.csv",
        [
            {"step": 0, "train/loss": 1.0, f"stability/theta_max/layer_00{evil}": 0.5},
            {"step": 1, "train/loss": 0.9},
        ],
    )
    rep = write_report([run_dir], tmp_path / "out")
    page = rep.html_path.read_text()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_cli_report_on_empty_directory_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) != 0
    assert "no logged run" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.html").exists()


def test_cli_report_prints_the_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_csv(tmp_path / "r1" / "metrics.csv", synthetic_rows())
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out
    assert "r1" in out
    assert "0.910" in out
