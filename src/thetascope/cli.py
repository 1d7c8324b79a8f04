"""Command line: ``thetascope demo | report | bench``.

Example:
    $ thetascope demo                      # 7 small runs on 2 CPU cores, then runs/report/report.html
    $ thetascope demo --preset gpu --out runs-gpu
    $ thetascope report runs/post_ln-no_warmup runs/pre_ln-no_warmup --out cmp
    $ thetascope bench spectral
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from thetascope.demo.train import PRESETS, VARIANTS

    p = sub.add_parser(
        "demo",
        help="train small GPT-style models (pre/post-LN, warmup variants) with all callbacks, then report",
        description="Train pre-LN and post-LN byte-level GPTs on the Python standard library's source with "
        "no warmup, LR warmup, temperature warmup and path-length scaling, with every thetascope callback "
        "attached, then write the report.",
    )
    presets = "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
    presets += "; signal: APJN depth profiles at init (pre/post-LN, DyT, Derf) and short runs, a few minutes"
    p.add_argument(
        "--preset", choices=[*PRESETS, "signal"], default="default", help=f"model size ({presets})"
    )
    p.add_argument("--out", type=Path, default=Path("runs"), help="output directory (default: runs/)")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        choices=[v.name for v in VARIANTS],
        help="only these runs (default: all): " + ", ".join(v.name for v in VARIANTS),
    )
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU intra-op threads (default: 1)")
    p.add_argument("--no-report", action="store_true", help="train only")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="figures and an HTML page from logged runs",
        description="Read CSVLogger/TensorBoard logs of one or more runs and write PNG figures and one "
        "self-contained report.html. A directory holding several runs counts as all of them.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, help="directory for report.html and the PNGs")
    p.add_argument("--prefix", default=None, help="key prefix the callbacks used (default: detect)")


def build_parser() -> argparse.ArgumentParser:
    """The ``thetascope`` argument parser.

    Example:
        >>> build_parser().parse_args(["report", "runs", "--out", "r"]).command
        'report'
    """
    parser = argparse.ArgumentParser(prog="thetascope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_report(sub)
    b = sub.add_parser("bench", help="run the benchmarks (python -m benchmarks [NAME ...])")
    b.add_argument("names", nargs="*", help="benchmark names (default: all)")
    return parser


def _report(run_dirs: Sequence[Path], out: Path, prefix: str | None) -> int:
    from thetascope.report.html import write_report
    from thetascope.report.reader import NoRunsError, findings_table_text

    try:
        rep = write_report(run_dirs, out, prefix=prefix)
    except NoRunsError as exc:
        print(f"thetascope report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {rep.html_path.resolve()}")
    print(findings_table_text(rep.findings))
    for diagnosis in rep.diagnoses:
        print()
        print(diagnosis.text())
    return 0


def _signal_demo(args: argparse.Namespace) -> int:
    from thetascope.demo.signal import SignalExperiment, run_signal_experiment

    exp = SignalExperiment() if args.steps is None else SignalExperiment(train_steps=args.steps)
    run_signal_experiment(args.out, exp)
    return 0 if args.no_report else _report([args.out / "signal"], args.out / "report", None)


def _demo(args: argparse.Namespace) -> int:
    import torch

    if args.preset == "signal":
        return _signal_demo(args)

    from thetascope.demo.train import run_demo

    # One intra-op thread by default: at d=64 the matrices are too small to gain from two, and on a busy
    # machine OpenMP threads waiting on each other made a step ten times slower (measured: 1.5 s vs 0.14 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads if args.threads else 1)
    start = time.perf_counter()
    try:
        runs = run_demo(
            args.preset,
            args.out,
            variants=args.variants,
            seed=args.seed,
            accelerator=args.accelerator,
            max_steps=args.steps,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"thetascope demo: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() also runs inside other processes (tests, notebooks)
    print(f"trained {len(runs)} runs in {time.perf_counter() - start:.0f} s -> {args.out}")
    if args.no_report:
        return 0
    rc = _report(runs, args.out / "report", None)
    print(f"total {time.perf_counter() - start:.0f} s")
    return rc


def _bench(names: Sequence[str]) -> int:
    root = Path.cwd()
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(
            "thetascope bench: no benchmarks/ package here (run it from the repository root)", file=sys.stderr
        )
        return 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.call([sys.executable, "-m", "benchmarks", *names], cwd=root, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``thetascope`` command; returns the exit status.

    Example:
        >>> main(["report", "/nonexistent", "--out", "/tmp/x"])  # doctest: +SKIP
        2
    """
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args.run_dirs, args.out, args.prefix)
    return _bench(args.names)


if __name__ == "__main__":
    raise SystemExit(main())
