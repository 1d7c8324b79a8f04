"""thetascope.report: read logged stability metrics and render PNG figures and a self-contained HTML page.

Reads files only (CSVLogger ``metrics.csv``, TensorBoard event files); never imports Lightning and never
executes or unpickles anything from a run directory. matplotlib (and tensorboard, for event files) are
imported only when a report is drawn.

Example:
    >>> from thetascope.report import load_runs, write_report
    >>> report = write_report(["runs"], "runs/report")  # doctest: +SKIP
"""

from thetascope.report.reader import (
    Findings,
    NoRunsError,
    RunData,
    Series,
    compute_findings,
    findings_table_text,
    load_runs,
)

__all__ = [
    "Findings",
    "NoRunsError",
    "RunData",
    "Series",
    "compute_findings",
    "findings_table_text",
    "load_runs",
    "write_report",
]


def __getattr__(name: str) -> object:
    # html/figures pull in matplotlib lazily; keep `import thetascope.report` light.
    if name == "write_report":
        from thetascope.report.html import write_report

        return write_report
    raise AttributeError(f"module 'thetascope.report' has no attribute {name!r}")
