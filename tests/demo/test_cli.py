"""The command line: parsing, bench delegation, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from thetascope.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_demo_defaults_and_choices() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.preset, args.out, args.variants) == ("default", Path("runs"), None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--preset", "huge"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--variants", "no-such-run"])
    assert build_parser().parse_args(["demo", "--preset", "gpt2"]).preset == "gpt2"


def test_bench_delegates_to_the_benchmarks_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(["bench", "no_such_benchmark"]) == 2  # the runner's own "unknown benchmark" exit


def test_bench_outside_the_repository_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["bench"]) == 2
    assert "no benchmarks/" in capsys.readouterr().err
