"""One self-contained HTML page: figures embedded as base64 PNG data URIs, inline CSS, no scripts, no links.

Every string that came from a run directory (run names, paths, keys) goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import datetime
import html
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from thetascope.report.curvature import curvature_figures
from thetascope.report.diagnosis import Diagnosis, diagnose_run
from thetascope.report.figures import FigureResult, draw_all
from thetascope.report.reader import (
    FINDINGS_COLUMNS,
    Findings,
    RunData,
    compute_findings,
    findings_table_text,
    format_value,
    load_runs,
)
from thetascope.report.signal import signal_figures

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; font-family: monospace; }
img { max-width: 100%; border: 1px solid #eee; }
.caption { color: #444; font-size: 0.9em; max-width: 60em; }
.missing { color: #8a4b00; font-size: 0.85em; }
code { background: #f3f3f3; padding: 0 3px; }
"""

_GUIDE = (
    (
        "median θ_max",
        "Typical worst-row attention sensitivity of a layer. Near 1 is normal (the paper's finding); "
        "it does not fall as training goes on, so stability has to come from the architecture.",
    ),
    (
        "early/late grad ratio",
        "Gradient norm of the early layers over the late ones. Far below 1 (e.g. < 0.1): "
        "early layers barely learn, the post-LN pathology; use pre-LN, a path-length (N^-1/4) scaling, or LR "
        "warmup.",
    ),
    (
        "grad spikes",
        "Robust (median/MAD) outliers of the global gradient norm or loss. Several early spikes: "
        "lower the learning rate, add or lengthen warmup, or clip gradients.",
    ),
    (
        "max S_l",
        "Largest sensitivity proxy (θ_max/τ)·B̄²·G_l. Steady growth over orders of magnitude: watch "
        "B̄ (hidden-state magnitude) and G_l; weight decay, QK-norm or a lower LR bound them.",
    ),
)


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced: the page, the figures (with their data), the findings and the
    diagnosis of every run (also written to ``diagnosis.txt``)."""

    html_path: Path
    figures: list[FigureResult]
    findings: list[Findings]
    notes: list[str]
    diagnoses: list[Diagnosis] = field(default_factory=list)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _findings_html(findings: Sequence[Findings]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in FINDINGS_COLUMNS)
    rows = []
    for f in findings:
        cells = "".join(
            f"<td>{html.escape(format_value(getattr(f, attr)))}</td>" for attr, _ in FINDINGS_COLUMNS
        )
        rows.append(f"<tr>{cells}</tr>")
    return f'<table id="findings"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _diagnosis_html(diagnoses: Sequence[Diagnosis]) -> list[str]:
    esc = html.escape
    parts = ["<h2>Diagnosis</h2>"]
    for d in diagnoses:
        parts.append(f"<h3><code>{esc(d.run)}</code></h3>")
        if not d.lines:
            parts.append('<p class="missing">Nothing to diagnose: no stability keys were logged.</p>')
            continue
        parts.append(
            '<table class="diagnosis"><thead><tr><th>topic</th><th>status</th><th>seen</th>'
            "<th>what to do</th></tr></thead><tbody>"
        )
        parts.extend(
            f'<tr><td>{esc(li.topic)}</td><td>{esc(li.status)}</td><td style="text-align:left">'
            f'{esc(li.seen)}</td><td style="text-align:left">{esc(li.advice)}</td></tr>'
            for li in d.lines
        )
        parts.append("</tbody></table>")
    return parts


def render_html(
    runs: Sequence[RunData],
    figures: Sequence[FigureResult],
    findings: Sequence[Findings],
    notes: Sequence[str],
    diagnoses: Sequence[Diagnosis] = (),
) -> str:
    """The report page as a string (pure function of its inputs; images read from the figure paths)."""
    esc = html.escape
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>thetascope report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>thetascope stability report</h1>",
        f"<p>{len(runs)} run(s), generated {esc(when)}.</p>",
        "<ul>",
        *(
            f"<li><code>{esc(r.name)}</code> — {esc(str(r.path))} ({len(r.scalars)} logged keys)</li>"
            for r in runs
        ),
        "</ul>",
        "<h2>Findings</h2>",
        _findings_html(findings),
        '<dl class="caption">',
        *(f"<dt><b>{esc(k)}</b></dt><dd>{esc(v)}</dd>" for k, v in _GUIDE),
        "</dl>",
    ]
    if diagnoses:
        parts.extend(_diagnosis_html(diagnoses))
    if notes:
        parts.append('<h2>Missing data</h2><ul class="missing">')
        parts.extend(f"<li>{esc(n)}</li>" for n in notes)
        parts.append("</ul>")
    for fig in figures:
        parts.append(f'<h2 id="{esc(fig.key)}">{esc(fig.title)}</h2>')
        if fig.path is not None:
            parts.append(_img_tag(fig.path, fig.title))
        else:
            parts.append('<p class="missing">Not drawn: no run logged the keys this figure needs.</p>')
        parts.append(f'<p class="caption">{esc(fig.caption)}</p>')
        if fig.missing:
            parts.append(
                '<ul class="missing">' + "".join(f"<li>{esc(m)}</li>" for m in fig.missing) + "</ul>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    run_dirs: Sequence[Path | str],
    out_dir: Path | str,
    prefix: str | None = None,
    stream: TextIO | None = None,
) -> Report:
    """Read the runs, draw the figures into ``out_dir`` and write ``out_dir/report.html``.

    Missing keys are listed on ``stream`` (stderr by default) and in the page.

    Raises:
        NoRunsError: when no logged run is found.

    Example:
        >>> write_report(["/nonexistent"], "/tmp/ts-report")  # doctest: +SKIP
    """
    err = stream if stream is not None else sys.stderr
    runs = load_runs(list(run_dirs), prefix=prefix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_all(runs, out)
    figures += signal_figures(runs, list(run_dirs), out)  # APJN vs depth, only when there is data
    figures += curvature_figures(runs, out)  # drawn only for runs with the CurvatureMonitor
    findings = [compute_findings(r) for r in runs]
    notes: list[str] = []
    for fig in figures:
        if fig.path is None:
            notes.append(f"figure '{fig.key}' not drawn: " + "; ".join(fig.missing))
    for run in runs:
        empty = [h for a, h in FINDINGS_COLUMNS[1:] if getattr(compute_findings(run), a) is None]
        if empty:
            notes.append(f"{run.name}: findings not available: {', '.join(empty)}")
    for n in notes:
        print(f"thetascope report: {n}", file=err)
    diagnoses = [diagnose_run(r) for r in runs]
    (out / "diagnosis.txt").write_text("\n\n".join(d.text() for d in diagnoses) + "\n", encoding="utf-8")
    page = render_html(runs, figures, findings, notes, diagnoses)
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return Report(html_path=html_path, figures=figures, findings=findings, notes=notes, diagnoses=diagnoses)


__all__ = ["Report", "findings_table_text", "render_html", "write_report"]
