"""A diagnosis in words from logged numbers: what was seen in a run and what to do about it.

Framework-free: the input is what a run logged, a mapping ``key -> [(step, value), ...]`` (keys with or
without the stability prefix, as :mod:`thetascope.report.reader` loads them), so the Lightning callbacks at
fit end, the monitor cores and ``thetascope report`` all produce the same table from the same numbers. Every
sentence is formatted from those numbers; a topic whose keys were not logged is left out.

Topics: gradient flow (the post-LN pathology: early layers starved of gradient, with its early/late ratio),
spikes (how many and between which steps), the theta distribution over layers, sensitivity growth, sharpness
against its stability threshold (when a curvature monitor logged it) and non-finite gradients.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from thetascope.keys import DEFAULT_PREFIX
from thetascope.report.reader import (
    RunData,
    Series,
    _to_series,
    compute_findings,
    format_value,
)

__all__ = [
    "PATHOLOGY_RATIO",
    "SENSITIVITY_GROWTH",
    "Diagnosis",
    "DiagnosisLine",
    "MeasuredHistory",
    "diagnose",
    "diagnose_run",
]

#: Early/late gradient-norm ratio (median over the second half of the measurements) below which the run
#: shows the post-LN gradient pathology: early layers get over 3x smaller gradients than late ones.
PATHOLOGY_RATIO = 0.3
#: Growth of the largest sensitivity proxy over the second half of the measurements flagged as worth watching.
SENSITIVITY_GROWTH = 10.0
#: Sharpness over its threshold at or above which a measurement counts as at the edge of stability.
EDGE_OF_STABILITY = 0.9

History = Mapping[str, Sequence[tuple[int, float]]]


@dataclass(frozen=True)
class DiagnosisLine:
    """One row of the diagnosis: a topic, its status (``ok``, ``info``, ``warn``, ``alert``), what the
    numbers show and what to do."""

    topic: str
    status: str
    seen: str
    advice: str


@dataclass(frozen=True)
class Diagnosis:
    """The diagnosis of one run: its rows, in a fixed topic order.

    Example:
        >>> d = diagnose({"grad/early_late_ratio": [(0, 0.02), (10, 0.03)]})
        >>> d.post_ln_pathology, d.lines[0].topic
        (True, 'post-LN gradient pathology')
    """

    run: str
    lines: tuple[DiagnosisLine, ...]

    @property
    def post_ln_pathology(self) -> bool:
        """True when the gradient-flow row names the post-LN pathology."""
        return any(line.topic == "post-LN gradient pathology" for line in self.lines)

    def text(self, width: int = 110) -> str:
        """The diagnosis as plain text: one block per row (status, topic, what was seen, what to do)."""
        if not self.lines:
            return f"diagnosis of {self.run}: nothing to diagnose (no stability keys were logged)"
        out = [f"diagnosis of {self.run}:"]
        pad = 2 + 5 + 2
        for line in self.lines:
            out.append(f"  {line.status.upper():<5}  {line.topic}: {line.seen}")
            out.append(" " * pad + f"-> {line.advice}")
        return "\n".join(_wrap(out, width, pad + 3))


def _wrap(lines: Iterable[str], width: int, indent: int) -> list[str]:
    import textwrap

    out: list[str] = []
    for line in lines:
        first = len(line) - len(line.lstrip())
        out.extend(
            textwrap.wrap(line, width, initial_indent="", subsequent_indent=" " * max(indent, first))
            or [line]
        )
    return out


class MeasuredHistory:
    """What a loop measured, kept on the host for the diagnosis: ``add`` each ``reduce`` output, ``diagnose``.

    At most ``max_points`` points per key: past that every other point is dropped, so a long run keeps an
    evenly thinned history with its first and latest measurements.

    Example:
        >>> h = MeasuredHistory(max_points=4)
        >>> for step in range(0, 100, 10):
        ...     h.add(step, {"stability/grad/early_late_ratio": 0.05})
        >>> len(h.series["stability/grad/early_late_ratio"]) <= 4, h.diagnose().post_ln_pathology
        (True, True)
    """

    def __init__(self, max_points: int = 1024, prefix: str | None = None) -> None:
        self.max_points = max(int(max_points), 3)
        self.prefix = prefix
        self.series: dict[str, list[tuple[int, float]]] = {}

    def add(self, step: int, values: Mapping[str, float]) -> None:
        """Keep ``values`` (finite ones) at ``step``; a second call at the same step replaces the first."""
        for key, value in values.items():
            v = float(value)
            if not math.isfinite(v):
                continue
            series = self.series.setdefault(key, [])
            if series and series[-1][0] == step:
                series[-1] = (int(step), v)
                continue
            series.append((int(step), v))
            if len(series) > self.max_points:
                del series[1:-1:2]

    def __len__(self) -> int:
        return sum(len(v) for v in self.series.values())

    def diagnose(self, run: str = "run") -> Diagnosis:
        """:func:`diagnose` of everything added so far."""
        return diagnose(self.series, run=run, prefix=self.prefix)


def _run_from_history(history: History, name: str, prefix: str | None) -> RunData:
    p = DEFAULT_PREFIX if prefix is None else prefix
    scalars: dict[str, Series] = {}
    for key, pairs in history.items():
        bare = key[len(p) :] if p and key.startswith(p) else key
        scalars[bare] = _to_series((int(s), float(v)) for s, v in pairs)
    return RunData(name=name, path=Path("."), scalars=scalars, prefix=p)


def diagnose(history: History, run: str = "run", prefix: str | None = None) -> Diagnosis:
    """Diagnose one run from its logged numbers (``key -> [(step, value), ...]``).

    Args:
        history: the logged scalars; keys may carry ``prefix`` (stripped) or not.
        run: the run's name, for the text.
        prefix: the key prefix (default ``"stability/"``).
    """
    return diagnose_run(_run_from_history(history, run, prefix))


def diagnose_run(run: RunData) -> Diagnosis:
    """Diagnose a run loaded by :func:`thetascope.report.reader.load_runs`."""
    lines = [
        line
        for line in (
            _gradient_flow(run),
            _spikes(run),
            _theta(run),
            _sensitivity(run),
            _sharpness(run),
            _nonfinite(run),
        )
        if line is not None
    ]
    return Diagnosis(run=run.name, lines=tuple(lines))


# ------------------------------------------------------------------------------------------------ topics


def _finite_pairs(s: Series | None) -> list[tuple[int, float]]:
    return [(st, v) for st, v in zip(s.steps, s.values) if math.isfinite(v)] if s is not None else []


def _f(v: float) -> str:
    return format_value(float(v))


def _recent(pairs: Sequence[tuple[int, float]]) -> Sequence[tuple[int, float]]:
    """The second half of the measurements (at least the last one): the state the run ended in.

    At initialisation gradients flow in every architecture; the post-LN imbalance builds up with training, so
    a whole-run median would hide it.
    """
    return pairs[len(pairs) // 2 :]


def _gradient_flow(run: RunData) -> DiagnosisLine | None:
    ratio = _finite_pairs(run.get("grad/early_late_ratio"))
    if not ratio:
        return None
    recent = _recent(ratio)
    median = statistics.median(v for _, v in recent)
    (first_step, first), (last_step, last) = ratio[0], ratio[-1]
    seen = (
        f"early/late layer gradient-norm ratio {_f(median)} (median of the last {len(recent)} of "
        f"{len(ratio)} measurements, steps {recent[0][0]}-{last_step}); {_f(first)} at step {first_step}, "
        f"{_f(last)} at step {last_step}"
    )
    layers = run.layered("grad_norm")
    if layers:
        first_id, last_id = min(layers), max(layers)
        lo, hi = _finite_pairs(layers[first_id]), _finite_pairs(layers[last_id])
        if lo and hi and first_id != last_id:
            seen += (
                f"; layer {first_id} gradient norm {_f(lo[-1][1])} vs layer {last_id} {_f(hi[-1][1])} at "
                f"step {lo[-1][0]}"
            )
    vanishing = _finite_pairs(run.get("grad/vanishing_layers"))
    if vanishing and vanishing[-1][1] > 0:
        seen += f"; {int(vanishing[-1][1])} layer(s) below the vanishing fraction of the largest"
    if median < PATHOLOGY_RATIO:
        return DiagnosisLine(
            "post-LN gradient pathology",
            "alert" if median < PATHOLOGY_RATIO / 5 else "warn",
            seen + f": early layers get {1 / median:.3g}x smaller gradients than late ones",
            "early layers learn slowly or not at all: use pre-LN or a learning-rate warmup (in our demo "
            "neither temperature warmup nor the N^(-1/4) path-length scaling alone lifted post-LN off "
            "the plateau)",
        )
    return DiagnosisLine(
        "gradient flow",
        "ok",
        seen,
        f"no post-LN pathology (ratio at or above {_f(PATHOLOGY_RATIO)}); nothing to do",
    )


def _spike_windows(run: RunData) -> list[tuple[int, int]]:
    """(previous measured step + 1, step) for every measurement that saw a spike since the previous one."""
    s = run.get("grad/spike")
    if s is None:
        return []
    out, prev = [], -1
    for st, v in zip(s.steps, s.values):
        if math.isfinite(v) and v > 0.5:
            out.append((prev + 1, st))
        prev = st
    return out


def _spikes(run: RunData) -> DiagnosisLine | None:
    f = compute_findings(run)
    if f.grad_spikes is None and f.loss_spikes is None:
        return None
    grad, loss = f.grad_spikes or 0, f.loss_spikes or 0
    measured = run.get("grad/spike") or run.get("grad/spike_count")
    up_to = f" up to step {measured.steps[-1]}" if measured else ""
    if grad + loss == 0:
        return DiagnosisLine("spikes", "ok", f"no gradient-norm or loss spike{up_to}", "nothing to do")
    windows = _spike_windows(run)
    when = ", ".join(f"steps {a}-{b}" for a, b in windows[:5]) + (" ..." if len(windows) > 5 else "")
    seen = f"{grad} gradient-norm and {loss} loss spike(s){up_to}" + (
        f", seen between {when}" if when else ""
    )
    early = bool(windows) and windows[0][1] <= max(measured.steps[-1] // 4, 1) if measured else False
    advice = (
        "spikes early in training: add or lengthen the learning-rate (or temperature) warmup"
        if early
        else "lower the learning rate, clip gradients, or check the batches around those steps"
    )
    return DiagnosisLine("spikes", "warn", seen, advice)


def _theta(run: RunData) -> DiagnosisLine | None:
    layers = run.layered("theta_max")
    values = [v for s in layers.values() for _, v in _finite_pairs(s)]
    if not values:
        values = [v for _, v in _finite_pairs(run.get("theta_max"))]
    if not values:
        return None
    median = compute_findings(run).median_theta_max
    assert median is not None
    near_one = sum(1 for v in values if v >= 0.99) / len(values)
    seen = (
        f"theta_max median {_f(median)}, range {_f(min(values))}-{_f(max(values))} over {len(values)} "
        f"readings; {100 * near_one:.0f}% at or above 0.99"
    )
    if layers:
        per_layer = {
            i: statistics.median(v for _, v in _finite_pairs(s))
            for i, s in layers.items()
            if _finite_pairs(s)
        }
        if len(set(per_layer.values())) > 1:
            top = max(per_layer, key=lambda i: per_layer[i])
            low = min(per_layer, key=lambda i: per_layer[i])
            seen += (
                f"; highest in layer {top} (median {_f(per_layer[top])}), lowest in layer {low} "
                f"({_f(per_layer[low])})"
            )
    advice = (
        "near 1 is the usual regime (it does not fall with training): sensitivity is set by B-bar and G_l, "
        "so watch those"
        if median >= 0.9
        else "attention is not near its worst case; sensitivity growth, if any, comes from B-bar and G_l"
    )
    return DiagnosisLine("theta distribution", "info", seen, advice)


def _sensitivity_series(run: RunData) -> list[tuple[int, float]]:
    pairs = _finite_pairs(run.get("sensitivity_max"))
    if pairs:
        return pairs
    by_step: dict[int, float] = {}
    for s in run.layered("sensitivity").values():
        for st, v in _finite_pairs(s):
            by_step[st] = max(v, by_step.get(st, -math.inf))
    return sorted(by_step.items())


def _sensitivity(run: RunData) -> DiagnosisLine | None:
    pairs = [(s, v) for s, v in _sensitivity_series(run) if v > 0]
    if not pairs:
        return None
    (s0, v0), (s1, v1) = pairs[0], pairs[-1]
    recent = _recent(pairs)
    (sr, vr) = recent[0]
    growth = v1 / vr
    peak_step, peak = max(pairs, key=lambda sv: sv[1])
    seen = (
        f"largest S_l {_f(v0)} at step {s0}, {_f(vr)} at step {sr}, {_f(v1)} at step {s1} "
        f"({v1 / v0:.3g}x over the run, {growth:.3g}x over its second half); peak {_f(peak)} at step "
        f"{peak_step}"
    )
    layers = run.layered("sensitivity")
    last_vals = {i: p[-1][1] for i, s in layers.items() if (p := _finite_pairs(s))}
    if len(last_vals) > 1:
        top = max(last_vals, key=lambda i: last_vals[i])
        seen += f"; layer {top} is the most sensitive at the end"
    if growth >= SENSITIVITY_GROWTH:
        return DiagnosisLine(
            "sensitivity growth",
            "warn",
            seen,
            f"still growing ({growth:.3g}x late in the run): bound B-bar and G_l with weight decay, QK-norm, "
            "a lower learning rate or a temperature warmup",
        )
    return DiagnosisLine(
        "sensitivity growth",
        "ok",
        seen,
        f"growth over the second half below {SENSITIVITY_GROWTH:g}x; nothing to do",
    )


def _sharpness(run: RunData) -> DiagnosisLine | None:
    ratio = _finite_pairs(run.get("curvature/stability_ratio"))
    sharp = _finite_pairs(run.get("curvature/precond_sharpness")) or _finite_pairs(
        run.get("curvature/sharpness")
    )
    thr = _finite_pairs(run.get("curvature/threshold"))
    if not ratio and sharp and thr:
        thr_at = dict(thr)
        ratio = [(s, v / thr_at[s]) for s, v in sharp if s in thr_at and thr_at[s] > 0]
    if not ratio:
        return None
    peak_step, peak = max(ratio, key=lambda sv: sv[1])
    last_step, last = ratio[-1]
    at_edge = sum(1 for _, v in ratio if v >= EDGE_OF_STABILITY)
    seen = (
        f"sharpness / threshold last {_f(last)} at step {last_step}, peak {_f(peak)} at step {peak_step}; "
        f"{at_edge} of {len(ratio)} measurements at or above {_f(EDGE_OF_STABILITY)}"
    )
    if sharp and thr:
        seen += f" (sharpness {_f(sharp[-1][1])}, threshold {_f(thr[-1][1])})"
    if peak > 1.0:
        return DiagnosisLine(
            "sharpness",
            "warn",
            seen,
            "above the edge of stability: expect loss oscillation or spikes; lower the learning rate or "
            "lengthen warmup",
        )
    if at_edge:
        return DiagnosisLine(
            "sharpness",
            "info",
            seen,
            "training at the edge of stability (normal for large learning rates); the learning rate is the "
            "limit",
        )
    return DiagnosisLine(
        "sharpness", "ok", seen, "well below the edge of stability; the learning rate could go higher"
    )


def _nonfinite(run: RunData) -> DiagnosisLine | None:
    pairs = _finite_pairs(run.get("grad/nonfinite"))
    if not pairs or pairs[-1][1] <= 0:
        return None
    first = next(s for s, v in pairs if v > 0)
    return DiagnosisLine(
        "non-finite gradients",
        "alert",
        f"{int(pairs[-1][1])} optimizer step(s) with NaN/inf gradients, first seen by step {first}",
        "check the loss scale (AMP), the learning rate and the data around that step",
    )
