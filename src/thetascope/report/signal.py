"""Figures of signal propagation: APJN vs depth on log-log axes.

Two sources: runs that logged ``apjn/layer_XX`` (the
:class:`~thetascope.callbacks.SignalPropagationMonitor`), drawn at their first and last measurement, and the
profiles file of the signal experiment (``signal/profiles.csv``, written by ``thetascope demo --preset
signal``), drawn per attention type with the mean over seeds and the fits summarised in the caption.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thetascope.report.figures import FigureResult, _colors, _new_figure, _save
from thetascope.report.reader import RunData, Series

__all__ = ["draw_experiment_figure", "fig_apjn_profile", "read_profiles", "signal_figures"]

_NORM_LABEL = {"pre": "pre-LN", "post": "post-LN", "dyt": "DyT", "derf": "Derf"}


def read_profiles(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``profiles.csv`` with numeric fields converted."""
    with open(path, newline="") as f:
        return [
            {
                **row,
                "depth": int(row["depth"]),
                "seed": int(row["seed"]),
                "layer": int(row["layer"]),
                "apjn": float(row["apjn"]),
                "stderr": float(row["stderr"]),
            }
            for row in csv.DictReader(f)
        ]


def _experiment_series(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Series]]:
    """``{attention: {norm: mean-over-seeds profile of the deepest model}}`` plus per-seed series."""
    out: dict[str, dict[str, Series]] = {}
    for att in sorted({r["attention"] for r in rows}):
        for norm in dict.fromkeys(r["norm"] for r in rows):
            sel = [r for r in rows if r["attention"] == att and r["norm"] == norm]
            if not sel:
                continue
            depth = max(r["depth"] for r in sel)
            by_layer: dict[int, list[float]] = {}
            for r in sel:
                if r["depth"] == depth and math.isfinite(r["apjn"]) and r["apjn"] > 0:
                    by_layer.setdefault(r["layer"], []).append(math.log(r["apjn"]))
            layers = sorted(by_layer)
            out.setdefault(att, {})[norm] = Series(
                tuple(layers), tuple(math.exp(statistics.fmean(by_layer[k])) for k in layers)
            )
            for seed in sorted({r["seed"] for r in sel}):
                pts = sorted(
                    (r["layer"], r["apjn"]) for r in sel if r["depth"] == depth and r["seed"] == seed
                )
                out[att][f"{norm}/seed{seed}"] = Series(tuple(p[0] for p in pts), tuple(p[1] for p in pts))
    return out


def draw_experiment_figure(rows: Sequence[dict[str, Any]], path: Path) -> dict[str, dict[str, Series]]:
    """Draw the experiment's profiles (one panel per attention type, log-log) to ``path``; return the data."""
    data = _experiment_series(rows)
    fig, axes = _new_figure(5.5 * max(len(data), 1), 4.5, ncols=max(len(data), 1))
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    colors = dict(zip(norms, _colors(len(norms))))
    for ax, (att, series) in zip(axes[0], data.items()):
        for name, s in series.items():
            norm = name.split("/")[0]
            if "/seed" in name:
                ax.plot(s.steps, s.values, color=colors[norm], lw=0.6, alpha=0.35)
            else:
                ax.plot(s.steps, s.values, color=colors[norm], lw=2.0, label=_NORM_LABEL.get(norm, norm))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{att} attention")
        ax.set_xlabel("depth l (blocks crossed)")
        ax.set_ylabel("APJN J(l)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("APJN vs depth at initialisation")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return data


def _fits_caption(fits_csv: Path) -> str:
    if not fits_csv.is_file():
        return ""
    with open(fits_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ""
    deepest = max(int(r["depth"]) for r in rows)
    parts = []
    for att in sorted({r["attention"] for r in rows}):
        for norm in dict.fromkeys(r["norm"] for r in rows):
            sel = [
                r for r in rows if r["attention"] == att and r["norm"] == norm and int(r["depth"]) == deepest
            ]
            if not sel:
                continue
            mean = {
                k: statistics.fmean(float(r[k]) for r in sel)
                for k in ("power_exponent", "power_r2", "stretched_beta", "stretched_r2")
            }
            verdicts = ", ".join(sorted({r["verdict"] for r in sel}))
            parts.append(
                f"{att} {_NORM_LABEL.get(norm, norm)}: zeta={mean['power_exponent']:.2f} "
                f"(R²={mean['power_r2']:.3f}), beta={mean['stretched_beta']:.2f} "
                f"(R²={mean['stretched_r2']:.3f}), {verdicts}"
            )
    return f" Fits at depth {deepest}, mean over {len(sel)} seeds: " + "; ".join(parts) + "."


def fig_apjn_profile(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """APJN vs depth of every run that logged ``apjn/layer_XX``: first measurement (solid), last (dashed)."""
    res = FigureResult(
        "apjn_profile",
        "Signal propagation: APJN vs depth",
        "APJN from the input of the first block to the output of block l, at the first measurement "
        "(initialisation, solid) and the last (dashed), log-log axes. A straight line is power-law growth "
        "(critical); upward curvature is stretched-exponential or exponential growth.",
    )
    fig, axes = _new_figure(10, 4.5)
    ax = axes[0][0]
    for run, color in zip(runs, _colors(len(runs))):
        layers = run.layered("apjn")
        if not layers:
            continue
        steps = sorted({s for series in layers.values() for s in series.finite().steps})
        if not steps:
            continue
        res.data[run.name] = {}
        for step, style in ((steps[0], "-o"), (steps[-1], "--")):
            pts = []
            for layer, s in layers.items():
                f = s.finite()
                if step in f.steps and f.values[f.steps.index(step)] > 0:
                    pts.append((layer + 1, f.values[f.steps.index(step)]))
            prof = Series(tuple(p[0] for p in pts), tuple(p[1] for p in pts))
            label = f"{run.name} (step {step})"
            ax.plot(prof.steps, prof.values, style, color=color, ms=3, label=label)
            res.data[run.name][f"step {step}"] = prof
            if len(steps) == 1:
                break
    if not res.data:
        return res
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("depth l (blocks crossed)")
    ax.set_ylabel("APJN")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.suptitle(res.title)
    res.path = _save(fig, out_dir, res.key)
    return res


def signal_figures(
    runs: Sequence[RunData], run_dirs: Sequence[Path | str], out_dir: Path
) -> list[FigureResult]:
    """The signal figures that have data: the experiment's (if a ``signal/profiles.csv`` lies under one of
    ``run_dirs``) and the logged-profile one; nothing otherwise, so other reports are unchanged."""
    out: list[FigureResult] = []
    for raw in run_dirs:
        root = Path(raw)
        found = sorted(root.rglob("profiles.csv")) if root.is_dir() else []
        for prof in found[:1]:
            res = FigureResult(
                "signal_experiment",
                "Signal propagation at initialisation (experiment)",
                "APJN from the first block's input to block l's output at initialisation, mean over seeds of "
                "the deepest models (thick) and each seed (thin), log-log axes."
                + _fits_caption(prof.parent / "fits.csv"),
            )
            res.data = draw_experiment_figure(read_profiles(prof), out_dir / f"{res.key}.png")
            res.path = out_dir / f"{res.key}.png"
            out.append(res)
        if out:
            break
    fig = fig_apjn_profile(runs, out_dir)
    if fig.path is not None:
        out.append(fig)
    return out
