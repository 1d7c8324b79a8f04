"""Reading logged runs: synthetic CSVs written here with the documented key names, values checked by hand."""

from __future__ import annotations

import csv
import pickle
import statistics
from pathlib import Path

import pytest

from thetascope.report.reader import (
    FINAL_LOSS_WINDOW,
    NoRunsError,
    compute_findings,
    discover_runs,
    findings_table_text,
    load_runs,
    read_metrics_csv,
)


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    """A CSVLogger-like file: union of keys as columns, blanks where a row did not log a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r} - {"step"})
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *keys])
        for r in rows:
            w.writerow([int(r["step"]), *("" if k not in r else repr(r[k]) for k in keys)])


def synthetic_rows(n_steps: int = 40, n_layers: int = 3, every: int = 5) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    for step in range(n_steps):
        rows.append({"step": step, "train/loss": 5.0 - 0.05 * step})
        if step % every == 0:
            r: dict[str, float] = {"step": step}
            for layer in range(n_layers):
                r[f"stability/theta_max/layer_{layer:02d}"] = 0.9 + 0.01 * layer
                r[f"stability/theta_max_lower/layer_{layer:02d}"] = 0.89 + 0.01 * layer
                r[f"stability/grad_norm/layer_{layer:02d}"] = 0.1 * (layer + 1) * (1 + step)
                r[f"stability/proj_norm/layer_{layer:02d}"] = 1.0 + step * 0.1
                r[f"stability/sensitivity/layer_{layer:02d}"] = 2.0 + layer + step
            r["stability/grad_norm/global"] = 1.0 + step
            r["stability/grad/early_late_ratio"] = 0.5 if step < 20 else 0.25
            r["stability/grad/spike"] = 1.0 if step == 15 else 0.0
            r["stability/grad/spike_count"] = 1.0 if step >= 15 else 0.0
            r["stability/loss/spike_count"] = 0.0
            r["stability/sensitivity_max"] = 4.0 + step
            rows.append(r)
        if step % 20 == 19:
            rows.append({"step": step, "val/loss": 4.0 - 0.01 * step})
    return rows


def test_csv_parsing_keeps_steps_and_skips_blanks(tmp_path: Path) -> None:
    write_csv(tmp_path / "metrics.csv", [{"step": 0, "a": 1.5}, {"step": 1, "b": 2.0}, {"step": 2, "a": 3.0}])
    data = read_metrics_csv(tmp_path / "metrics.csv")
    assert data["a"].steps == (0, 2)
    assert data["a"].values == (1.5, 3.0)
    assert data["b"].values == (2.0,)


def test_findings_equal_hand_computed_values(tmp_path: Path) -> None:
    rows = synthetic_rows()
    write_csv(tmp_path / "run" / "metrics.csv", rows)
    (run,) = load_runs([tmp_path / "run"])
    assert run.name == "run"
    f = compute_findings(run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert f.final_train_loss == pytest.approx(sum(losses[-FINAL_LOSS_WINDOW:]) / FINAL_LOSS_WINDOW)
    thetas = [v for r in rows for k, v in r.items() if k.startswith("stability/theta_max/")]
    assert f.median_theta_max == pytest.approx(statistics.median(thetas))
    assert f.median_theta_max == pytest.approx(0.91)
    # 8 measurements: 4 at 0.5 (steps 0..15) and 4 at 0.25.
    assert f.early_late_ratio == pytest.approx(0.375)
    assert f.grad_spikes == 1
    assert f.loss_spikes == 0
    assert f.final_val_loss == pytest.approx(4.0 - 0.01 * 39)
    assert f.max_sensitivity == pytest.approx(4.0 + 35)
    assert "0.910" in findings_table_text([f])


def test_layered_keys_strip_the_prefix_and_sort_by_layer(tmp_path: Path) -> None:
    write_csv(tmp_path / "metrics.csv", synthetic_rows(n_layers=12))
    (run,) = load_runs([tmp_path])
    layers = run.layered("theta_max")
    assert list(layers) == list(range(12))
    assert run.has("grad_norm/global")
    assert not run.has("temperature")


def test_custom_prefix_is_detected(tmp_path: Path) -> None:
    write_csv(tmp_path / "metrics.csv", [{"step": 0, "diag/theta_max/layer_00": 0.5, "train/loss": 1.0}])
    (run,) = load_runs([tmp_path])
    assert run.prefix == "diag/"
    assert run.layered("theta_max")[0].values == (0.5,)


def test_discovery_of_several_runs_and_lightning_layouts(tmp_path: Path) -> None:
    write_csv(tmp_path / "a" / "metrics.csv", synthetic_rows(5))
    (tmp_path / "a" / "tb").mkdir()
    (tmp_path / "a" / "tb" / "events.out.tfevents.1.host").write_bytes(b"")  # belongs to run a
    write_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv", synthetic_rows(5))
    found = discover_runs(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in found) == ["a", "lightning_logs/version_0"]
    assert len(found[tmp_path / "a"]) == 2
    names = [r.name for r in load_runs([tmp_path])]
    assert names == ["a", "lightning_logs/version_0"]


def test_empty_directory_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing logged")
    with pytest.raises(NoRunsError, match="no logged run"):
        load_runs([tmp_path])


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("raise SystemExit('unpickled!')",))


def test_checkpoints_and_yaml_in_a_run_are_never_loaded(tmp_path: Path) -> None:
    write_csv(tmp_path / "metrics.csv", synthetic_rows(3))
    (tmp_path / "last.ckpt").write_bytes(pickle.dumps(_Boom()))
    (tmp_path / "hparams.yaml").write_text("x: !!python/object/apply:os.system ['touch pwned']\n")
    (run,) = load_runs([tmp_path])
    assert run.sources == [str(tmp_path / "metrics.csv")]
    assert not (tmp_path / "pwned").exists()


def test_report_package_imports_neither_lightning_nor_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, thetascope.report.html, thetascope.report.figures; "
        "print(sorted(m for m in ('lightning', 'torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stacked_layers_are_read_per_stack(tmp_path: Path) -> None:
    """Encoder-decoder runs key layers ``{field}/{stack}/layer_XX``: stacks read apart, findings see all."""
    from thetascope.keys import layer_key
    from thetascope.report.figures import fig_theta

    rows: list[dict[str, float]] = []
    for step in (0, 5):
        r: dict[str, float] = {"step": step}
        for stack, theta in (("encoder", 0.5), ("decoder_cross", 0.9)):
            for layer in range(2):
                r[layer_key("stability/", "theta_max", layer, stack=stack)] = theta + 0.01 * layer
        rows.append(r)
    write_csv(tmp_path / "run/metrics.csv", rows)
    (run,) = load_runs([tmp_path / "run"])
    assert run.stacks("theta_max") == ["decoder_cross", "encoder"]  # CSV columns are sorted
    assert run.layered("theta_max") == {}
    assert run.layered("theta_max", "encoder")[1].values == (0.51, 0.51)
    assert run.layered("theta_max", "decoder_cross")[0].values == (0.9, 0.9)
    assert compute_findings(run).median_theta_max == pytest.approx(statistics.median([0.5, 0.51, 0.9, 0.91]))
    pytest.importorskip("matplotlib")
    (tmp_path / "out").mkdir()
    fig = fig_theta([run], tmp_path / "out")
    assert set(fig.data["run"]) == {
        "theta_max/encoder/layer_00",
        "theta_max/encoder/layer_01",
        "theta_max/decoder_cross/layer_00",
        "theta_max/decoder_cross/layer_01",
    }
