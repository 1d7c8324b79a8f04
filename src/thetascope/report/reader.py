"""Read what a training run logged (CSVLogger ``metrics.csv`` and TensorBoard event files) into plain arrays.

Nothing in a run directory is executed or unpickled: CSV is parsed with :mod:`csv`, event files with
TensorBoard's ``EventAccumulator`` (protobuf parsing only) when TensorBoard is importable. Checkpoints and
``hparams.yaml`` are never opened.

Run discovery: every ``metrics.csv`` and ``*tfevents*`` file below a given directory is found; a file belongs
to the nearest directory at or above it (up to the given directory) that holds a ``metrics.csv`` directly, or
to its own directory when there is none. So ``runs/`` (many runs), ``runs/post_ln-lr_warmup`` (one run, CSV
plus ``tb/``) and a Lightning ``lightning_logs/version_0`` all work.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from thetascope.keys import (
    DEFAULT_PREFIX,
    PROJ_NORM,
    SENSITIVITY,
    SENSITIVITY_MAX,
    THETA_MAX,
    parse_layer_key,
)

# Number of trailing train/loss values averaged for the "final train loss".
FINAL_LOSS_WINDOW = 20


class NoRunsError(RuntimeError):
    """No logged run (no ``metrics.csv``, no TensorBoard event file) was found."""


@dataclass(frozen=True)
class Series:
    """One logged scalar: steps and values in step order (non-finite values kept; plots drop them).

    Example:
        >>> Series((0, 1), (1.0, 2.0)).last
        2.0
    """

    steps: tuple[int, ...]
    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def last(self) -> float:
        """The last logged value."""
        return self.values[-1]

    def finite(self) -> Series:
        """The same series without NaN/inf values."""
        pairs = [(s, v) for s, v in zip(self.steps, self.values) if math.isfinite(v)]
        return Series(tuple(s for s, _ in pairs), tuple(v for _, v in pairs))


@dataclass
class RunData:
    """All scalars of one run, keyed by the logged name with the stability prefix removed.

    ``train/loss`` stays ``train/loss``; ``stability/theta_max/layer_03`` becomes ``theta_max/layer_03``.

    Example:
        >>> run = RunData("r", Path("."), {"theta_max/layer_01": Series((0,), (0.9,))})
        >>> run.layered("theta_max")[1].values
        (0.9,)
    """

    name: str
    path: Path
    scalars: dict[str, Series]
    sources: list[str] = field(default_factory=list)
    prefix: str = DEFAULT_PREFIX

    def get(self, key: str) -> Series | None:
        """A series by its prefix-free key, or None when the run did not log it."""
        s = self.scalars.get(key)
        return s if s is not None and len(s) > 0 else None

    def layered(self, metric: str, stack: str | None = None) -> dict[int, Series]:
        """Per-layer series of ``metric`` (e.g. ``"theta_max"``) of one stack, by layer index, in layer order.

        ``stack`` selects the layers of one stack of a multi-stack model (``"encoder"``, ``"decoder"``,
        ``"decoder_cross"``, see :data:`thetascope.keys.STACKS`); ``None`` the layers logged without one.
        """
        out: dict[int, Series] = {}
        for key, series in self.scalars.items():
            parsed = parse_layer_key(key)
            if parsed is not None and parsed[:2] == (metric, stack) and len(series):
                out[parsed[2]] = series
        return dict(sorted(out.items()))

    def stacks(self, metric: str) -> list[str | None]:
        """The stacks ``metric`` was logged for (``[None]`` for a single-stack model), in key order.

        Example:
            >>> s = Series((0,), (0.5,))
            >>> keys = ("theta_max/encoder/layer_00", "theta_max/decoder/layer_00")
            >>> run = RunData("r", Path("."), dict.fromkeys(keys, s))
            >>> run.stacks("theta_max")
            ['encoder', 'decoder']
        """
        found: list[str | None] = []
        for key in self.scalars:
            parsed = parse_layer_key(key)
            if parsed is not None and parsed[0] == metric and parsed[1] not in found:
                found.append(parsed[1])
        return found

    def has(self, key: str) -> bool:
        """True when ``key`` was logged (a per-layer metric name counts when any layer was logged)."""
        return self.get(key) is not None or bool(self.layered(key))


def _parse_float(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics_csv(path: Path) -> dict[str, Series]:
    """Parse a Lightning CSVLogger ``metrics.csv`` (a ``step`` column, one column per key, blanks elsewhere).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = p.write_text("step,train/loss\\n0,2.5\\n1,\\n2,2.0\\n")
        >>> read_metrics_csv(p)["train/loss"]
        Series(steps=(0, 2), values=(2.5, 2.0))
    """
    columns: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        for i, row in enumerate(reader):
            step_v = _parse_float(row.get("step") or "")
            step = int(step_v) if step_v is not None and math.isfinite(step_v) else i
            for key, text in row.items():
                if key is None or key in ("step", "epoch") or text is None:
                    continue
                value = _parse_float(text)
                if value is not None:
                    columns.setdefault(key, []).append((step, value))
    return {k: _to_series(v) for k, v in columns.items()}


def _to_series(pairs: Iterable[tuple[int, float]]) -> Series:
    ordered = sorted(pairs, key=lambda sv: sv[0])  # stable: equal steps keep their logged order
    return Series(tuple(s for s, _ in ordered), tuple(v for _, v in ordered))


def read_event_files(directory: Path) -> dict[str, Series] | None:
    """Scalars of the TensorBoard event files directly in ``directory``; None when TensorBoard is absent.

    Example:
        >>> read_event_files(Path("/nonexistent")) in (None, {})
        True
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except Exception:
        return None
    if not directory.is_dir():
        return {}
    acc = EventAccumulator(str(directory), size_guidance={SCALARS: 0})
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = _to_series((int(e.step), float(e.value)) for e in acc.Scalars(tag))
    return out


def _strip_prefix(scalars: dict[str, Series], prefix: str | None) -> tuple[dict[str, Series], str]:
    """Remove the stability prefix; with ``prefix=None`` infer it from the per-layer theta/grad keys."""
    if prefix is None:
        prefix = DEFAULT_PREFIX
        if not any(k.startswith(prefix) for k in scalars):
            for key in scalars:
                for anchor in (
                    f"{THETA_MAX}/layer_",
                    "grad_norm/layer_",
                    f"{PROJ_NORM}/layer_",
                    "grad_norm/global",
                ):
                    if anchor in key:
                        prefix = key[: key.index(anchor)]
                        break
                else:
                    continue
                break
    if not prefix:
        return dict(scalars), prefix
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in scalars.items()}, prefix


def _owner(file: Path, root: Path) -> Path:
    """The run directory a log file belongs to (see the module docstring)."""
    d = file.parent
    while True:
        if (d / "metrics.csv").is_file():
            return d
        if d == root or root not in d.parents:
            return file.parent
        d = d.parent


def discover_runs(root: Path) -> dict[Path, list[Path]]:
    """Map each run directory under ``root`` to its log files (``metrics.csv`` and event files).

    Example:
        >>> discover_runs(Path("/nonexistent"))
        {}
    """
    if not root.is_dir():
        return {}
    found: dict[Path, list[Path]] = {}
    for f in sorted(root.rglob("*")):
        if f.is_symlink() or not f.is_file():
            continue
        if f.name == "metrics.csv" or "tfevents" in f.name:
            found.setdefault(_owner(f, root), []).append(f)
    return found


def load_run(run_dir: Path, files: Sequence[Path], name: str, prefix: str | None = None) -> RunData:
    """Merge the CSV and TensorBoard scalars of one run (CSV wins where both logged the same key)."""
    scalars: dict[str, Series] = {}
    sources: list[str] = []
    for f in files:
        if f.name == "metrics.csv":
            for k, s in read_metrics_csv(f).items():
                scalars[k] = (
                    s
                    if k not in scalars
                    else _to_series([*zip(scalars[k].steps, scalars[k].values), *zip(s.steps, s.values)])
                )
            sources.append(str(f))
    event_dirs = sorted({f.parent for f in files if "tfevents" in f.name})
    for d in event_dirs:
        tb = read_event_files(d)
        if tb is None:
            print(
                f"thetascope report: tensorboard not importable; skipping event files in {d}", file=sys.stderr
            )
            continue
        for k, s in tb.items():
            scalars.setdefault(k, s)
        sources.append(str(d))
    stripped, used_prefix = _strip_prefix(scalars, prefix)
    return RunData(name=name, path=run_dir, scalars=stripped, sources=sources, prefix=used_prefix)


def load_runs(paths: Sequence[Path | str], prefix: str | None = None) -> list[RunData]:
    """Every run found under the given directories, in argument order then path order.

    Raises:
        NoRunsError: when no directory holds any logged run.

    Example:
        >>> try:
        ...     load_runs(["/nonexistent"])
        ... except NoRunsError as exc:
        ...     print(str(exc)[:15])
        no logged run (
    """
    runs: list[RunData] = []
    for raw in paths:
        root = Path(raw)
        for run_dir, files in discover_runs(root).items():
            rel = run_dir.relative_to(root).as_posix() if run_dir != root else ""
            name = rel if rel and rel != "." else (root.resolve().name or str(root))
            runs.append(load_run(run_dir, files, name, prefix))
    if not runs:
        raise NoRunsError(
            "no logged run (metrics.csv or TensorBoard event file) found in: "
            + ", ".join(str(p) for p in paths)
        )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same run name under two arguments: qualify with the directory
        for r in runs:
            if names.count(r.name) > 1:
                r.name = str(r.path)
    return runs


# ----------------------------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Findings:
    """Headline numbers of one run; None where the run did not log what is needed.

    Attributes:
        median_theta_max: median over all per-layer ``theta_max`` readings (every layer, every measurement);
            the headline ``theta_max`` series when no per-layer key was logged.
        early_late_ratio: median of ``grad/early_late_ratio`` over measurements (below 1: early layers get
            smaller gradients than late ones).
        grad_spikes: detected gradient-norm spikes (last ``grad/spike_count``, else the sum of
            ``grad/spike``).
        loss_spikes: last ``loss/spike_count``.
        final_train_loss: mean of the last :data:`FINAL_LOSS_WINDOW` logged ``train/loss`` values.
        final_val_loss: last ``val/loss``.
        max_sensitivity: largest ``sensitivity_max`` (else largest per-layer ``sensitivity``).
    """

    run: str
    median_theta_max: float | None
    early_late_ratio: float | None
    grad_spikes: int | None
    loss_spikes: int | None
    final_train_loss: float | None
    final_val_loss: float | None
    max_sensitivity: float | None


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _all_layers(run: RunData, metric: str) -> list[Series]:
    """The per-layer series of ``metric`` of every stack."""
    return [s for stack in run.stacks(metric) for s in run.layered(metric, stack).values()]


def compute_findings(run: RunData) -> Findings:
    """The numbers of the report's findings table for one run.

    Example:
        >>> run = RunData("r", Path("."), {"train/loss": Series((0, 1), (3.0, 2.0))})
        >>> compute_findings(run).final_train_loss
        2.5
    """
    theta_vals = [v for s in _all_layers(run, THETA_MAX) for v in _finite(s.values)]
    if not theta_vals and run.get(THETA_MAX):
        theta_vals = _finite(run.scalars[THETA_MAX].values)
    ratio = run.get("grad/early_late_ratio")
    ratio_vals = _finite(ratio.values) if ratio else []
    spike_count = run.get("grad/spike_count")
    spikes = run.get("grad/spike")
    grad_spikes: int | None = None
    if spike_count is not None and _finite(spike_count.values):
        grad_spikes = int(max(_finite(spike_count.values)))
    elif spikes is not None:
        grad_spikes = int(sum(1 for v in spikes.values if math.isfinite(v) and v > 0.5))
    loss_spike = run.get("loss/spike_count")
    loss_vals = _finite(loss_spike.values) if loss_spike else []
    train = run.get("train/loss")
    train_vals = _finite(train.values) if train else []
    tail = train_vals[-FINAL_LOSS_WINDOW:]
    val = run.get("val/loss")
    val_vals = _finite(val.values) if val else []
    sens = run.get(SENSITIVITY_MAX)
    sens_vals = (
        _finite(sens.values)
        if sens
        else [v for s in _all_layers(run, SENSITIVITY) for v in _finite(s.values)]
    )
    return Findings(
        run=run.name,
        median_theta_max=statistics.median(theta_vals) if theta_vals else None,
        early_late_ratio=statistics.median(ratio_vals) if ratio_vals else None,
        grad_spikes=grad_spikes,
        loss_spikes=int(max(loss_vals)) if loss_vals else None,
        final_train_loss=sum(tail) / len(tail) if tail else None,
        final_val_loss=val_vals[-1] if val_vals else None,
        max_sensitivity=max(sens_vals) if sens_vals else None,
    )


FINDINGS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("median_theta_max", "median θ_max"),
    ("early_late_ratio", "early/late grad ratio"),
    ("grad_spikes", "grad spikes"),
    ("loss_spikes", "loss spikes"),
    ("final_train_loss", f"final train loss (last {FINAL_LOSS_WINDOW})"),
    ("final_val_loss", "final val loss"),
    ("max_sensitivity", "max S_l"),
)


def format_value(value: float | int | str | None) -> str:
    """How a findings value is printed (also in the HTML): 3 significant decimals, ``n/a`` for None.

    Example:
        >>> format_value(None), format_value(2), format_value(0.123456), format_value(1234.5)
        ('n/a', '2', '0.123', '1.23e+03')
    """
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3) else f"{value:.3f}"


def findings_table_text(findings: Sequence[Findings]) -> str:
    """A plain-text table of the findings for the console.

    Example:
        >>> f = Findings("a", 1.0, 0.5, 0, None, 2.0, None, None)
        >>> "a" in findings_table_text([f])
        True
    """
    headers = [h for _, h in FINDINGS_COLUMNS]
    rows = [[format_value(getattr(f, attr)) for attr, _ in FINDINGS_COLUMNS] for f in findings]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    return "\n".join(lines)
