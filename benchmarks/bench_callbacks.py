"""Overhead of the thetascope callbacks on the CPU model of issue 13, paired and interleaved in one run.

Model: a 6-layer pre-LN ``nn.TransformerEncoder`` language model (d=128, 4 heads, causal mask, byte
vocabulary), batch 8, L=128, AdamW, trained for 200 steps on 2 threads. Configurations, each a fresh fit of
the same model, data and seed in a worker process of its own; the workers take turns step by step (one runs
at a time), so drifts of a shared machine hit all configurations alike, step by step:

* ``none``: no callbacks;
* ``all``: AttentionSensitivityMonitor and GradientFlowMonitor at ``every_n_steps=50`` and a TemperatureWarmup
  from 4 to 1 over the first 100 steps (steps 0, 50, 100, 150 are measured);
* ``temperature``: only the TemperatureWarmup, over all 200 steps, so its hook is active on every step;
* ``control``: no callbacks again, in a worker of its own: its ratios to ``none`` are the noise floor.

Printed, as medians over the rounds of one value per round: the total training time over that of ``none``;
the median over steps of the ratio of a step to the same step of ``none`` (paired step by step) for the
unmeasured steps (also after the warmup alone, where no hook is installed) and for the temperature hook's
steps; one measurement, the median over the measured steps 50/100/150 (step 0 also holds the cold power
iteration) of that ratio less the unmeasured steps' one, i.e. the extra time in steps of ``none``; and the
control's ratios.
All of it twice: on the wall clock and on the process's CPU time, which other load on a shared machine
disturbs less. ``BENCH_STEPS``/``BENCH_ROUNDS`` in the environment shorten the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._timing import Run, lockstep_fits, median, quiet, step_ratios, steps_where, timed_fit

STEPS = 200
EVERY = 50
WARMUP = 100
ROUNDS = 4
THREADS = 2
D, LAYERS, HEADS, BATCH, LENGTH, VOCAB = 128, 6, 4, 8, 128, 256


def make_module(
    *, d: int = D, layers: int = LAYERS, heads: int = HEADS, length: int = LENGTH, vocab: int = VOCAB
) -> Any:
    """The benchmark's LightningModule (a fresh, seeded instance)."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch import nn

    class _EncoderLM(pl.LightningModule):
        mask: torch.Tensor  # a registered buffer

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(0.02 * torch.randn(1, length, d))
            layer = nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)
            self.register_buffer(
                "mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x) + self.pos[:, : x.shape[1]]
            h = self.encoder(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
            return self.head(self.norm(h))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x).reshape(-1, vocab), y.reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-4)

    return _EncoderLM()


def make_data(steps: int, *, batch: int = BATCH, length: int = LENGTH, vocab: int = VOCAB) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (steps * batch, length + 1), generator=gen)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch)


def callbacks_for(config: str, steps: int, every: int = EVERY, warmup: int = WARMUP) -> list[Any]:
    from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup

    if config in ("none", "control"):
        return []
    if config == "temperature":
        return [TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=10 * steps, log=False)]
    if config == "all":
        return [
            AttentionSensitivityMonitor(every_n_steps=every),
            GradientFlowMonitor(every_n_steps=every),
            TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=warmup),
        ]
    raise ValueError(f"unknown config {config!r}")


class _Job:
    """One worker's fits for :func:`~benchmarks._timing.lockstep_fits` (module level, so it pickles)."""

    def __init__(self, steps: int, every: int, warmup: int) -> None:
        self.steps, self.every, self.warmup = steps, every, warmup

    def __call__(self, config: str, round_index: int) -> tuple[Any, Any, list[Any]]:
        return make_module, make_data(self.steps), callbacks_for(config, self.steps, self.every, self.warmup)

    def warm(self, config: str) -> None:
        # first-call costs (lazy imports, first captures, allocations) of every callback, in every worker
        timed_fit(make_module, make_data(6), callbacks_for("all", 6, every=5, warmup=3), 6)


def run_rounds(
    configs: tuple[str, ...], steps: int, rounds: int, every: int, warmup: int, threads: int = THREADS
) -> dict[str, list[Run]]:
    """``rounds`` fits of each configuration, one worker process each, taking turns step by step."""
    return lockstep_fits(_Job(steps, every, warmup), configs, steps, rounds, threads=threads)


def main(
    steps: int | None = None, rounds: int | None = None, every: int = EVERY, warmup: int = WARMUP
) -> dict[str, float]:
    """Print (and return) the paired ratios described in the module docstring."""
    with quiet():
        return _main(steps, rounds, every, warmup)


def _main(steps: int | None, rounds: int | None, every: int, warmup: int) -> dict[str, float]:
    steps = steps or int(os.environ.get("BENCH_STEPS", STEPS))
    rounds = rounds or int(os.environ.get("BENCH_ROUNDS", ROUNDS))
    threads = int(os.environ.get("BENCH_THREADS", THREADS))
    configs = ("none", "all", "temperature", "control")
    print(
        f"CPU ({threads} threads); TransformerEncoder LM {LAYERS}x{D}, {HEADS} heads, pre-LN, B={BATCH}, "
        f"L={LENGTH}; {steps} steps, every_n_steps={every}, warmup {warmup}; {rounds} rounds, one process "
        "per configuration, in lockstep"
    )
    runs = run_rounds(configs, steps, rounds, every, warmup, threads)
    measured = {s for s in range(steps) if s % every == 0}
    later = {s for s in measured if s > 0}
    result: dict[str, float] = {}
    for clock, cpu in (("wall", False), ("cpu", True)):

        def paired(r: Run, base: Run, keep: Callable[[int], bool], cpu: bool = cpu) -> float:
            return median(step_ratios(r, base, keep, cpu=cpu))

        def plain(s: int) -> bool:
            return s >= 3 and s not in measured

        def after_warmup(s: int) -> bool:
            return s >= warmup and plain(s)

        total, un, late, temp, meas, ctl_total, ctl_un = [], [], [], [], [], [], []
        for base, full, hook, ctl in zip(runs["none"], runs["all"], runs["temperature"], runs["control"]):
            base_total = sum(base.series(cpu))
            total.append(sum(full.series(cpu)) / base_total)
            un.append(paired(full, base, plain))
            late.append(paired(full, base, after_warmup))
            temp.append(paired(hook, base, plain))
            # a measured step's extra time, in steps of the run without callbacks at the same moment, beyond
            # the unmeasured steps' own overhead
            meas.append(median([r - un[-1] for r in step_ratios(full, base, lambda s: s in later, cpu=cpu)]))
            ctl_total.append(sum(ctl.series(cpu)) / base_total)
            ctl_un.append(paired(ctl, base, plain))
        step_ms = 1e3 * median([median(steps_where(r, plain, cpu=cpu)) for r in runs["none"]])
        rows = [
            ("all callbacks, whole run / none", "total_ratio", total),
            ("unmeasured step, all callbacks / none", "unmeasured_ratio", un),
            ("  the same after the warmup (tau = 1)", "unmeasured_after_warmup_ratio", late),
            ("temperature hook active, step / none", "temperature_ratio", temp),
            ("one measurement (extra time), in training steps", "measurement_steps", meas),
            ("noise floor: no callbacks again, whole run / none", "control_total_ratio", ctl_total),
            ("noise floor: no callbacks again, step / none", "control_unmeasured_ratio", ctl_un),
        ]
        print(f"\n{clock} clock: median training step without callbacks {step_ms:.1f} ms")
        print(f"{'paired ratio (median over rounds)':<58}{'value':>8}   per round")
        result[f"{clock}_step_ms"] = step_ms
        for label, key, values in rows:
            result[f"{clock}_{key}"] = median(values)
            print(f"{label:<58}{median(values):>8.3f}   " + " ".join(f"{v:.3f}" for v in values))
    return result


if __name__ == "__main__":
    main()
