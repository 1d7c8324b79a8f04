"""Report figures of the curvature monitor: sharpness against its threshold, traces by type, the Taylor check.

Drawn only when some run logged ``curvature/`` keys, so reports of runs without the monitor stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from thetascope.keys import CURVATURE_SUBLAYER_TYPES
from thetascope.report.figures import FigureResult, _colors, _finish, _new_figure, _plot, _save
from thetascope.report.reader import RunData, Series

__all__ = ["curvature_figures", "fig_curvature_sharpness", "fig_curvature_taylor", "fig_curvature_traces"]


def _compared(run: RunData) -> tuple[str, Series] | None:
    """The sharpness the threshold applies to: preconditioned (Adam) when logged, else the plain one."""
    for key in ("curvature/precond_sharpness", "curvature/sharpness"):
        s = run.get(key)
        if s is not None and len(s.finite()):
            return key, s
    return None


def fig_curvature_sharpness(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """Sharpness (solid) against the optimizer's stability threshold (dashed), log scale, per run."""
    res = FigureResult(
        "curvature_sharpness",
        "Sharpness against the edge-of-stability threshold",
        "Top Hessian eigenvalue of the loss on the held batch (solid; for Adam the preconditioned "
        "λ_max(P⁻¹H) with the optimizer's own second moment) and the optimizer's stability threshold at the "
        "step's learning rate (dashed: 2/lr for SGD, (2+2β₁)/((1−β₁)·lr) for Adam). Reaching the dashed line "
        "is the edge of stability; staying far below it means the learning rate is not what limits progress.",
    )
    fig, axes = _new_figure(10, 4.5)
    ax = axes[0][0]
    for run, color in zip(runs, _colors(len(runs))):
        found = _compared(run)
        if found is None:
            res.missing.append(f"{run.name}: no curvature/sharpness")
            continue
        key, s = found
        res.data[run.name] = {key: s}
        _plot(ax, s, color=color, lw=1.6, label=f"{run.name} ({key.split('/')[-1]})")
        thr = run.get("curvature/threshold")
        if thr is not None and len(thr.finite()):
            _plot(ax, thr, color=color, lw=1.0, ls="--")
            res.data[run.name]["curvature/threshold"] = thr
    if res.data and all(v > 0 for d in res.data.values() for s in d.values() for v in s.finite().values):
        ax.set_yscale("log")
    return _finish(res, fig, ax, out_dir, ylabel="eigenvalue")


def fig_curvature_traces(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """Hutchinson trace per sublayer type at the last measurement, with ± one standard error, per run."""
    res = FigureResult(
        "curvature_traces",
        "Where the curvature lives: Hessian trace per sublayer type",
        "Hutchinson estimate of the trace of each diagonal Hessian block, summed per sublayer type "
        "(attention Q, K, V, O, feed-forward, norms, embeddings, head), at each run's last measurement; "
        "error bars are one standard error of the estimate.",
    )
    fig, axes = _new_figure(10, 4.5)
    ax = axes[0][0]
    types = [
        t
        for t in CURVATURE_SUBLAYER_TYPES
        if any(r.get(f"curvature/trace_type/{t}") is not None for r in runs)
    ]
    width = 0.8 / max(len(runs), 1)
    for i, (run, color) in enumerate(zip(runs, _colors(len(runs)))):
        vals, errs, shown = [], [], []
        for j, t in enumerate(types):
            s = run.get(f"curvature/trace_type/{t}")
            if s is None or not len(s.finite()):
                continue
            se = run.get(f"curvature/trace_type_stderr/{t}")
            vals.append(s.finite().last)
            errs.append(se.finite().last if se is not None and len(se.finite()) else 0.0)
            shown.append(j)
            res.data.setdefault(run.name, {})[f"curvature/trace_type/{t}"] = s
        if not shown:
            res.missing.append(f"{run.name}: no curvature/trace_type/* keys")
            continue
        ax.bar([j + i * width for j in shown], vals, width, yerr=errs, color=color, label=run.name, capsize=2)
    if not res.data:
        return res
    ax.set_xticks([j + (len(runs) - 1) * width / 2 for j in range(len(types))], types)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("sublayer type")
    ax.set_ylabel("trace (sum of eigenvalues)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(res.title)
    res.path = _save(fig, out_dir, res.key)
    return res


def fig_curvature_taylor(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """Predicted (first and second order) against observed loss change of the measured steps."""
    res = FigureResult(
        "curvature_taylor",
        "Taylor check: predicted against observed loss change",
        "For each measured step, the loss change on the held batch predicted to first order (gᵀΔθ, crosses) "
        "and second order (gᵀΔθ + ½ΔθᵀHΔθ, dots) against the change observed. On the diagonal the quadratic "
        "model of the loss describes the step; second-order points far off it mean the step left the region "
        "where the local curvature describes the loss (large steps, instability).",
    )
    fig, axes = _new_figure(6.5, 5.5)
    ax = axes[0][0]
    lo, hi = 0.0, 0.0
    for run, color in zip(runs, _colors(len(runs))):
        obs = run.get("curvature/loss_change")
        first, second = run.get("curvature/taylor_first"), run.get("curvature/taylor_second")
        if obs is None or second is None:
            res.missing.append(f"{run.name}: no curvature/loss_change or curvature/taylor_second")
            continue
        o = dict(zip(obs.steps, obs.values))
        res.data[run.name] = {"curvature/loss_change": obs, "curvature/taylor_second": second}
        for series, marker, label in ((second, "o", "2nd order"), (first, "x", "1st order")):
            if series is None:
                continue
            pts = [(o[s], v) for s, v in zip(series.steps, series.values) if s in o]
            if not pts:
                continue
            xs, ys = zip(*pts)
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
            ax.plot(xs, ys, marker, ls="", color=color, ms=5, alpha=0.8, label=f"{run.name} {label}")
    if res.data:
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    return _finish(res, fig, ax, out_dir, ylabel="predicted loss change", xlabel="observed loss change")


def curvature_figures(runs: Sequence[RunData], out_dir: Path) -> list[FigureResult]:
    """The curvature figures, or none when no run logged ``curvature/sharpness``.

    Example:
        >>> curvature_figures([RunData("r", Path("."), {})], Path("."))
        []
    """
    if not any(r.get("curvature/sharpness") is not None for r in runs):
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [f(runs, out_dir) for f in (fig_curvature_sharpness, fig_curvature_traces, fig_curvature_taylor)]
