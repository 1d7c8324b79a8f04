"""GPU cost of the thetascope callbacks on GPT-2 shapes, paired in one run: ``make bench-gpu``.

Run ``python -m benchmarks.gpu`` on one CUDA device (H100/H200: a few minutes). Shapes: GPT-2 124M (12
layers, d=768, 12 heads, B=8, L=1024) and 774M (36 layers, d=1280, 20 heads, B=4, L=1024) of
:class:`thetascope.demo.model.GPT` (``F.scaled_dot_product_attention``), bf16 mixed precision, AdamW. Per
shape, in one process and interleaved:

* training runs without callbacks and with all three (AttentionSensitivityMonitor and GradientFlowMonitor at
  ``every_n_steps=50``, 64 rows per head in every layer; TemperatureWarmup active on every step): the
  unmeasured step ratio, the measured step (step 50) as a fraction of a step, the step amortised over 50
  steps, and the peak memory ratio;
* the theta bracket against the sorted-prefix greedy on the rows one measurement of a layer holds
  (``B * heads * 64`` rows of length L);
* a warm SpectralNormEstimator call on all Q/K/V/O matrices against an exact SVD norm per matrix, with the
  estimate's worst relative error.

``--small`` (automatic without CUDA) runs tiny shapes in seconds on CPU, so the test suite keeps this script
working; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks._timing import Run, median, quiet, steps_where, time_call, timed_fit


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    d: int
    heads: int
    batch: int
    length: int
    vocab: int


FULL = (Shape("gpt2-124M", 12, 768, 12, 8, 1024, 50257), Shape("gpt2-774M", 36, 1280, 20, 4, 1024, 50257))
SMALL = (Shape("tiny-2x32", 2, 32, 4, 2, 32, 64),)
ROWS_PER_HEAD = 64


@dataclass(frozen=True)
class Plan:
    steps: int  # per training run
    every: int  # every_n_steps of the monitors
    rounds: int  # interleaved rounds of (none, all)
    repeats: int  # timed calls of the functional comparisons


FULL_PLAN = Plan(steps=60, every=50, rounds=2, repeats=5)
SMALL_PLAN = Plan(steps=8, every=4, rounds=1, repeats=2)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _module(shape: Shape) -> Callable[[], Any]:
    import lightning.pytorch as pl
    import torch.nn.functional as F

    from thetascope.demo.model import GPT, GPTConfig

    class _LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            cfg = GPTConfig(
                vocab_size=shape.vocab,
                block_size=shape.length,
                n_layer=shape.layers,
                n_head=shape.heads,
                n_embd=shape.d,
            )
            self.model = GPT(cfg)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.model(x).reshape(-1, shape.vocab), y.reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    return _LM


def _data(shape: Shape, steps: int) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, shape.vocab, (steps * shape.batch, shape.length + 1), generator=gen)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=shape.batch)


def _callbacks(config: str, plan: Plan) -> list[Any]:
    from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup

    if config == "none":
        return []
    return [
        AttentionSensitivityMonitor(every_n_steps=plan.every, rows_per_head=ROWS_PER_HEAD, log_heatmap=False),
        GradientFlowMonitor(every_n_steps=plan.every),
        TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=100 * plan.steps, log=False),
    ]


def training_ratios(shape: Shape, plan: Plan, precision: str) -> dict[str, float]:
    """Unmeasured, measured and amortised step ratios and the peak memory ratio, all callbacks vs none."""
    make = _module(shape)
    data = _data(shape, plan.steps)
    if plan.rounds > 1:  # a warm-up fit: first-call costs (allocator, kernels, lazy imports) land here
        timed_fit(make, _data(shape, 3), _callbacks("all", Plan(3, 2, 1, 1)), 3, precision=precision)
    runs: dict[str, list[Run]] = {"none": [], "all": []}
    for _ in range(plan.rounds):
        for config in runs:
            runs[config].append(
                timed_fit(make, data, _callbacks(config, plan), plan.steps, precision=precision)
            )
    measured = {s for s in range(plan.steps) if s % plan.every == 0}
    later = sorted(s for s in measured if s > 0)

    def unmeasured(r: Run) -> float:
        return median(steps_where(r, lambda s: s >= 2 and s not in measured))

    un, frac, amort, mem = [], [], [], []
    for base, full in zip(runs["none"], runs["all"]):
        step, full_step = unmeasured(base), unmeasured(full)
        extra = median([full.times[s] - full_step for s in later])
        un.append(full_step / step)
        frac.append(extra / step)
        amort.append((full_step + extra / plan.every) / step)
        mem.append(full.peak_bytes / base.peak_bytes if base.peak_bytes else float("nan"))
    return {
        "step_ms": 1e3 * median([unmeasured(r) for r in runs["none"]]),
        "unmeasured_ratio": median(un),
        "measured_step_fraction": median(frac),
        "amortised_ratio": median(amort),
        "peak_memory_ratio": median(mem),
    }


def bracket_vs_greedy(shape: Shape, plan: Plan, device: torch.device) -> dict[str, float]:
    from thetascope.functional.theta import balanced_mass_factor, balanced_mass_greedy

    gen = torch.Generator(device=device).manual_seed(0)
    n_rows = shape.batch * shape.heads * min(ROWS_PER_HEAD, shape.length)
    logits = 2.0 * torch.randn(n_rows, shape.length, device=device, generator=gen)
    causal = torch.arange(shape.length, device=device)[None, :] > torch.randint(
        0, shape.length, (n_rows, 1), device=device, generator=gen
    )
    probs = torch.softmax(logits.masked_fill(causal, float("-inf")).to(torch.bfloat16).float(), dim=-1)
    t_bracket = time_call(lambda: balanced_mass_factor(probs, validate=False), plan.repeats)
    t_greedy = time_call(lambda: balanced_mass_greedy(probs), plan.repeats)
    return {
        "bracket_ms": 1e3 * t_bracket,
        "greedy_ms": 1e3 * t_greedy,
        "bracket_vs_greedy": t_bracket / t_greedy,
    }


def power_vs_svd(shape: Shape, plan: Plan, device: torch.device) -> dict[str, float]:
    from thetascope.functional.spectral import SpectralNormEstimator

    gen = torch.Generator().manual_seed(0)
    d, rank = shape.d, min(8, shape.d)
    mats: dict[str, torch.Tensor] = {}
    for layer in range(shape.layers):
        for kind in ("q", "k", "v", "o"):
            # trained-like: a decaying rank-8 spectrum plus a noise bulk at 0.25 of the top value
            a = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0]
            b = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0]
            s = 0.8 ** torch.arange(rank, dtype=torch.float32)
            w = a @ torch.diag(s) @ b.T + torch.randn(d, d, generator=gen) * (0.25 / (2 * d**0.5))
            mats[f"{layer}.{kind}"] = w.to(device)
    est = SpectralNormEstimator()
    est(mats)  # the cold call
    drift = {k: w + 1e-3 * torch.randn_like(w) * w.norm() / d for k, w in mats.items()}
    t_power = time_call(lambda: est(drift), plan.repeats)
    exact: dict[str, torch.Tensor] = {}

    def svd() -> None:
        for k, w in drift.items():
            exact[k] = torch.linalg.matrix_norm(w.double() if device.type == "cpu" else w, ord=2)

    t_svd = time_call(svd, 1)
    got = est(drift)
    truth = {k: torch.linalg.matrix_norm(w.double(), ord=2) for k, w in drift.items()}
    err = max(abs(1 - float(got[k]) / float(truth[k])) for k in drift)
    return {
        "power_ms": 1e3 * t_power,
        "svd_ms": 1e3 * t_svd,
        "svd_vs_power": t_svd / t_power,
        "power_rel_err": err,
    }


GOALS = {
    "unmeasured_ratio": "<= 1.005",
    "amortised_ratio": "<= 1.01",
    "measured_step_fraction": "<= 0.15 (774M)",
    "bracket_vs_greedy": "<= 2",
    "svd_vs_power": ">= 1000",
    "power_rel_err": "<= 1e-3",
    "peak_memory_ratio": "<= 1.05",
}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run every comparison on every shape; print one table; return ``{shape: {metric: value}}``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (automatic without CUDA)")
    args = parser.parse_args(argv)
    with quiet():
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    shapes, plan = (SMALL, SMALL_PLAN) if small else (FULL, FULL_PLAN)
    precision = "bf16-mixed" if cuda else "32-true"
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    note = " --small: tiny shapes, the numbers mean nothing" if small else ""
    print(f"device: {where}; torch {torch.__version__}; precision {precision}; SDPA{note}", flush=True)
    results: dict[str, dict[str, float]] = {}
    for shape in shapes:
        start = time.perf_counter()
        res = training_ratios(shape, plan, precision)
        res |= bracket_vs_greedy(shape, plan, device)
        res |= power_vs_svd(shape, plan, device)
        results[shape.name] = res
        print(f"  {shape.name}: {time.perf_counter() - start:.1f} s", flush=True)
    names = list(results)
    print(f"\n{'metric':<26}" + "".join(f"{n:>14}" for n in names) + f"{'goal':>18}")
    for key in next(iter(results.values())):
        print(
            f"{key:<26}" + "".join(f"{results[n][key]:>14.4g}" for n in names) + f"{GOALS.get(key, ''):>18}"
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
