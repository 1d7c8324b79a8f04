"""PNG figures of logged stability metrics, several runs overlaid.

Each ``fig_*`` function draws one figure from a list of :class:`~thetascope.report.reader.RunData`, saves it,
and returns a :class:`FigureResult` holding exactly the data it drew (so tests can compare it with the logs)
and what was missing. matplotlib is imported inside the functions and used through ``Figure`` objects with the
Agg canvas, so no global pyplot state or display is touched.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thetascope.keys import (
    PROJ_NORM,
    SENSITIVITY,
    SENSITIVITY_MAX,
    TEMPERATURE_FIELD,
    THETA_MAX,
    THETA_MAX_LOWER,
    THETA_P10,
    layer_key,
)
from thetascope.report.reader import RunData, Series


@dataclass
class FigureResult:
    """One figure: where it was saved, the data drawn (``data[run][label] -> Series``) and what was missing.

    ``path`` is None when no run had anything to draw.
    """

    key: str
    title: str
    caption: str
    path: Path | None = None
    data: dict[str, dict[str, Series]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _colors(n: int, cmap: str = "tab10") -> list[Any]:
    from matplotlib import colormaps

    cm = colormaps[cmap]
    if cmap == "tab10":
        return [cm(i % 10) for i in range(n)]
    return [cm(0.05 + 0.9 * i / max(n - 1, 1)) for i in range(n)]


def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Any, out_dir: Path, key: str) -> Path:
    path = out_dir / f"{key}.png"
    fig.savefig(path)
    return path


def _plot(ax: Any, s: Series, **kw: Any) -> None:
    f = s.finite()
    ax.plot(f.steps, f.values, **kw)


def _positive(s: Series) -> bool:
    return all(v > 0 for v in s.finite().values)


def moving_average(s: Series, window: int | None = None) -> Series:
    """Trailing moving average (window ``max(1, len/25)`` by default) for a readable loss curve.

    Example:
        >>> moving_average(Series((0, 1, 2, 3), (4.0, 2.0, 4.0, 2.0)), window=2).values
        (4.0, 3.0, 3.0, 3.0)
    """
    w = window or max(1, len(s) // 25)
    out: list[float] = []
    acc = 0.0
    for i, v in enumerate(s.values):
        acc += v
        if i >= w:
            acc -= s.values[i - w]
        out.append(acc / min(i + 1, w))
    return Series(s.steps, tuple(out))


def fig_loss(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """Training loss (lines) and validation loss (markers) per run."""
    res = FigureResult(
        "loss",
        "Loss",
        "Training loss per logged step (faint), its moving average (lines) and validation loss (dots), "
        "nats per byte.",
    )
    fig, axes = _new_figure(10, 4.5)
    ax = axes[0][0]
    for run, color in zip(runs, _colors(len(runs))):
        train, val = run.get("train/loss"), run.get("val/loss")
        if train is None and val is None:
            res.missing.append(f"{run.name}: no train/loss or val/loss")
            continue
        res.data[run.name] = {}
        if train is not None:
            smooth = moving_average(train.finite())
            _plot(ax, train, color=color, lw=0.6, alpha=0.25)
            _plot(ax, smooth, color=color, lw=1.6, label=run.name)
            res.data[run.name]["train/loss"] = train
            res.data[run.name]["train/loss (moving average)"] = smooth
        if val is not None:
            f = val.finite()
            ax.plot(f.steps, f.values, "o", color=color, ms=5, mec="black", mew=0.5)
            res.data[run.name]["val/loss"] = val
    return _finish(res, fig, ax, out_dir, ylabel="loss (nats)")


def _finish(
    res: FigureResult, fig: Any, ax: Any, out_dir: Path, ylabel: str, xlabel: str = "step"
) -> FigureResult:
    if not res.data:
        return res
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(res.title)
    res.path = _save(fig, out_dir, res.key)
    return res


def _global_grad(run: RunData) -> Series | None:
    return run.get("grad_norm/global") or run.get("grad_norm_global")


def fig_grad_global(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """Global gradient norm per run (log scale) with measurement steps flagged by ``grad/spike`` marked."""
    res = FigureResult(
        "grad_norm_global",
        "Global gradient norm",
        "Global gradient norm (sqrt of the sum of squares, before clipping) at each measurement; red-edged "
        "crosses mark measurements whose grad/spike flag says a gradient or loss spike happened since the "
        "previous one.",
    )
    fig, axes = _new_figure(10, 4.5)
    ax = axes[0][0]
    for run, color in zip(runs, _colors(len(runs))):
        g = _global_grad(run)
        if g is None:
            res.missing.append(f"{run.name}: no grad_norm/global")
            continue
        _plot(ax, g, color=color, lw=1.2, label=run.name)
        res.data[run.name] = {"grad_norm/global": g}
        flag = run.get("grad/spike")
        if flag is None:
            res.missing.append(f"{run.name}: no grad/spike (spikes not marked)")
            continue
        spike_steps = {s for s, v in zip(flag.steps, flag.values) if math.isfinite(v) and v > 0.5}
        pairs = [(s, v) for s, v in zip(g.steps, g.values) if s in spike_steps and math.isfinite(v)]
        spikes = Series(tuple(s for s, _ in pairs), tuple(v for _, v in pairs))
        res.data[run.name]["spikes"] = spikes
        if pairs:
            ax.plot(spikes.steps, spikes.values, "X", color=color, ms=7, mec="red", mew=1.0)
    if res.data and all(_positive(d["grad_norm/global"]) for d in res.data.values()):
        ax.set_yscale("log")
    return _finish(res, fig, ax, out_dir, ylabel="‖g‖ (global)")


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _grid(n: int) -> tuple[int, int]:
    ncols = min(n, 4)
    return math.ceil(n / ncols), ncols


def _per_layer_grid(
    runs: Sequence[RunData],
    out_dir: Path,
    res: FigureResult,
    metric: str,
    ylabel: str,
    band: str | None = None,
    extra: str | None = None,
    log: bool = False,
    ylim: tuple[float, float] | None = None,
) -> FigureResult:
    """One panel per run (and stack, in multi-stack models), one line per layer (colour = depth), optional
    ``band`` metric as the lower edge and an optional ``extra`` per-layer metric drawn dashed."""
    have = [(r, stack) for r in runs for stack in r.stacks(metric) if r.layered(metric, stack)]
    for r in runs:
        if not r.stacks(metric):
            res.missing.append(f"{r.name}: no {metric}/layer_XX keys")
    if not have:
        return res
    nrows, ncols = _grid(len(have))
    fig, axes = _new_figure(4.2 * ncols, 3.3 * nrows + 0.6, nrows, ncols, sharex=True, sharey=True)
    n_layers = max(max(r.layered(metric, stack)) for r, stack in have) + 1
    colors = _colors(n_layers, "viridis")
    for i, (run, stack) in enumerate(have):
        ax = axes[i // ncols][i % ncols]
        res.data.setdefault(run.name, {})
        lower = run.layered(band, stack) if band else {}
        if band and not lower:
            res.missing.append(f"{run.name}: no {band}/layer_XX keys (band not drawn)")
        for layer, s in run.layered(metric, stack).items():
            color = colors[layer % len(colors)]
            _plot(ax, s, color=color, lw=1.1, label=f"layer {layer}")
            res.data[run.name][layer_key("", metric, layer, stack)] = s
            lo = lower.get(layer)
            if lo is not None:
                hi = dict(zip(s.steps, s.values))
                pts = [(st, lv, hi[st]) for st, lv in zip(lo.steps, lo.values) if st in hi]
                pts = [p for p in pts if math.isfinite(p[1]) and math.isfinite(p[2])]
                if pts:
                    ax.fill_between(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        [p[2] for p in pts],
                        color=color,
                        alpha=0.25,
                        lw=0,
                    )
                res.data[run.name][layer_key("", band or "", layer, stack)] = lo
        for layer, s in (run.layered(extra, stack) if extra else {}).items():
            _plot(ax, s, color=colors[layer % len(colors)], lw=0.8, ls="--")
            res.data[run.name][layer_key("", extra or "", layer, stack)] = s
        ax.set_title(run.name if stack is None else f"{run.name} ({stack})", fontsize=9)
        ax.grid(alpha=0.3)
        if log and all(_positive(s) for s in run.layered(metric, stack).values()):
            ax.set_yscale("log")
        if ylim:
            ax.set_ylim(*ylim)
    for j in range(len(have), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle(res.title)
    res.path = _save(fig, out_dir, res.key)
    return res


def fig_theta(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """theta_max per layer over training, the certified bracket theta_max_lower..theta_max as a band."""
    res = FigureResult(
        "theta",
        "Balanced-mass factor θ over training (per layer)",
        "θ_max per layer: the largest certified upper bound over the sampled attention rows; the shaded band "
        "reaches down to θ_max_lower (the largest certified lower bound). Dashed: the 10th percentile of the "
        "rows' θ (θ_p10), which shows whether a minority of rows is peaked. θ = 1 means a row can split its "
        "mass in half, the most sensitive a softmax can be; θ near 0 means one-hot rows.",
    )
    return _per_layer_grid(
        runs, out_dir, res, THETA_MAX, "θ", band=THETA_MAX_LOWER, extra=THETA_P10, ylim=(-0.02, 1.02)
    )


def fig_proj_norm(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """G_l (product of the four projection spectral norms) per layer over training."""
    res = FigureResult(
        "proj_norm",
        "Projection-norm product G_l over training (per layer)",
        "G_l = ‖W_O‖‖W_Q‖‖W_K‖‖W_V‖ (spectral norms, power iteration), the quartic factor of attention "
        "sensitivity; steady growth means the attention path is getting more sensitive.",
    )
    return _per_layer_grid(runs, out_dir, res, PROJ_NORM, "G_l", log=True)


def _profile(run: RunData, metric: str, late: bool) -> Series | None:
    layers = run.layered(metric)
    if not layers:
        return None
    xs: list[int] = []
    ys: list[float] = []
    for layer, s in layers.items():
        vals = list(s.finite().values)
        if not vals:
            continue
        half = len(vals) // 2
        part = vals[half:] if late else vals[: max(1, half)]
        xs.append(layer)
        ys.append(statistics.median(part))
    return Series(tuple(xs), tuple(ys)) if xs else None


def fig_grad_profile(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """Per-layer gradient-norm profile: median over the late half (solid) and the early half (dashed)."""
    res = FigureResult(
        "grad_profile",
        "Per-layer gradient norm profile",
        "Median gradient norm of each layer's parameters over the second half of the measurements (solid) "
        "and the first half (dashed). A healthy pre-LN stack is roughly flat; post-LN typically shows early "
        "and middle layers orders of magnitude below the last ones (the depth pathology).",
    )
    fig, axes = _new_figure(10, 4.5)
    ax = axes[0][0]
    all_pos = True
    for run, color in zip(runs, _colors(len(runs))):
        late = _profile(run, "grad_norm", late=True)
        early = _profile(run, "grad_norm", late=False)
        if late is None:
            res.missing.append(f"{run.name}: no grad_norm/layer_XX keys")
            continue
        ax.plot(late.steps, late.values, "-o", color=color, ms=3, label=run.name)
        res.data[run.name] = {"late median": late}
        if early is not None:
            ax.plot(early.steps, early.values, "--", color=color, lw=0.9, alpha=0.7)
            res.data[run.name]["early median"] = early
        all_pos = all_pos and _positive(late) and (early is None or _positive(early))
    if res.data and all_pos:
        ax.set_yscale("log")
    _integer_x(ax)
    return _finish(res, fig, ax, out_dir, ylabel="gradient norm", xlabel="layer")


def fig_sensitivity(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """S_l over training (max over layers) and across layers (last measurement)."""
    res = FigureResult(
        "sensitivity",
        "Sensitivity proxy S_l",
        "Left: S_max = max over layers of S_l = (θ_max/τ)·B̄²·G_l over training. Right: S_l per layer at the "
        "last measurement. Growth by orders of magnitude flags an attention path that amplifies "
        "perturbations.",
    )
    fig, axes = _new_figure(12, 4.5, 1, 2)
    ax_t, ax_l = axes[0][0], axes[0][1]
    positive = True
    for run, color in zip(runs, _colors(len(runs))):
        layers = run.layered(SENSITIVITY, (run.stacks(SENSITIVITY) or [None])[0])
        over = run.get(SENSITIVITY_MAX)
        if over is None and layers:
            by_step: dict[int, float] = {}
            for s in layers.values():
                for st, v in zip(s.steps, s.values):
                    if math.isfinite(v):
                        by_step[st] = max(by_step.get(st, -math.inf), v)
            over = (
                Series(tuple(sorted(by_step)), tuple(by_step[k] for k in sorted(by_step)))
                if by_step
                else None
            )
        if over is None and not layers:
            res.missing.append(f"{run.name}: no sensitivity keys")
            continue
        res.data[run.name] = {}
        if over is not None:
            _plot(ax_t, over, color=color, lw=1.2, label=run.name)
            res.data[run.name][SENSITIVITY_MAX] = over
            positive = positive and _positive(over)
        if layers:
            last = Series(tuple(layers), tuple(s.last for s in layers.values()))
            ax_l.plot(last.steps, last.values, "-o", color=color, ms=3, label=run.name)
            res.data[run.name]["last per layer"] = last
            positive = positive and _positive(last)
        else:
            res.missing.append(f"{run.name}: no sensitivity/layer_XX keys (per-layer panel)")
    if not res.data:
        return res
    if positive:
        ax_t.set_yscale("log")
        ax_l.set_yscale("log")
    _integer_x(ax_l)
    ax_l.set_xlabel("layer")
    ax_l.set_ylabel("S_l (last measurement)")
    ax_l.grid(alpha=0.3)
    return _finish(res, fig, ax_t, out_dir, ylabel="S_max")


def fig_temperature(runs: Sequence[RunData], out_dir: Path) -> FigureResult:
    """Attention temperature tau per run (only runs with a TemperatureWarmup log it)."""
    res = FigureResult(
        "temperature",
        "Attention temperature τ",
        "τ as applied to the attention logits (logits divided by τ): TemperatureWarmup lowers it from "
        "τ_start to 1; runs without it stay at τ = 1.",
    )
    fig, axes = _new_figure(10, 3.5)
    ax = axes[0][0]
    for run, color in zip(runs, _colors(len(runs))):
        t = run.get(TEMPERATURE_FIELD)
        if t is None:
            res.missing.append(f"{run.name}: no temperature (τ = 1 unless set elsewhere)")
            continue
        _plot(ax, t, color=color, lw=1.5, label=run.name)
        res.data[run.name] = {TEMPERATURE_FIELD: t}
    return _finish(res, fig, ax, out_dir, ylabel="τ")


FIGURES: tuple[Callable[[Sequence[RunData], Path], FigureResult], ...] = (
    fig_loss,
    fig_grad_global,
    fig_theta,
    fig_grad_profile,
    fig_proj_norm,
    fig_sensitivity,
    fig_temperature,
)


def draw_all(runs: Sequence[RunData], out_dir: Path) -> list[FigureResult]:
    """Draw every figure into ``out_dir`` (created if needed); a figure with nothing to draw has no path.

    Example:
        >>> import tempfile
        >>> run = RunData("r", Path("."), {"train/loss": Series((0, 1), (3.0, 2.0))})
        >>> [f.key for f in draw_all([run], Path(tempfile.mkdtemp())) if f.path]
        ['loss']
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    return [f(runs, out_dir) for f in FIGURES]
