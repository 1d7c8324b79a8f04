"""Overhead of the thetascope callbacks on the CPU model of issue 13, paired and interleaved in one run.

Model: a 6-layer pre-LN ``nn.TransformerEncoder`` language model (d=128, 4 heads, causal mask, byte
vocabulary), batch 8, L=128, AdamW, trained for 200 steps on 2 threads. Configurations, each a fresh fit of
the same model, data and seed, interleaved round by round so slow drifts of a shared machine hit all alike:

* ``none``: no callbacks;
* ``all``: AttentionSensitivityMonitor and GradientFlowMonitor at ``every_n_steps=50`` and a TemperatureWarmup
  from 4 to 1 over the first 100 steps (steps 0, 50, 100, 150 are measured);
* ``temperature``: only the TemperatureWarmup, over all 200 steps, so its hook is active on every step.

Printed (medians over the rounds of per-round paired ratios against ``none`` of the same round): the total
training time, the median unmeasured step, the temperature hook's step, and one measurement (the extra time of
a measured step, steps 50/100/150; step 0 also holds the cold power iteration) as a multiple of a median step.
All of it twice: on the wall clock and on the process's CPU time, which other load on a shared machine
disturbs less. ``BENCH_STEPS``/``BENCH_ROUNDS`` in the environment shorten the run.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks._timing import Run, median, quiet, steps_where, timed_fit

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

    if config == "none":
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


def run_rounds(
    configs: tuple[str, ...], steps: int, rounds: int, every: int, warmup: int
) -> dict[str, list[Run]]:
    data = make_data(steps)
    timed_fit(make_module, make_data(6), callbacks_for("all", 6, every=5, warmup=3), 6)  # first-call costs
    runs: dict[str, list[Run]] = {c: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            runs[c].append(timed_fit(make_module, data, callbacks_for(c, steps, every, warmup), steps))
    return runs


def main(
    steps: int | None = None, rounds: int | None = None, every: int = EVERY, warmup: int = WARMUP
) -> dict[str, float]:
    """Print (and return) the paired ratios described in the module docstring."""
    with quiet():
        return _main(steps, rounds, every, warmup)


def _main(steps: int | None, rounds: int | None, every: int, warmup: int) -> dict[str, float]:
    steps = steps or int(os.environ.get("BENCH_STEPS", STEPS))
    rounds = rounds or int(os.environ.get("BENCH_ROUNDS", ROUNDS))
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", THREADS)))
    configs = ("none", "all", "temperature")
    print(
        f"CPU ({torch.get_num_threads()} threads); TransformerEncoder LM {LAYERS}x{D}, {HEADS} heads, "
        f"pre-LN, B={BATCH}, L={LENGTH}; {steps} steps, every_n_steps={every}, warmup {warmup}; {rounds} "
        "rounds, interleaved"
    )
    runs = run_rounds(configs, steps, rounds, every, warmup)
    measured = {s for s in range(steps) if s % every == 0}
    later = {s for s in measured if s > 0}
    result: dict[str, float] = {}
    for clock, cpu in (("wall", False), ("cpu", True)):

        def unmeasured(r: Run, cpu: bool = cpu) -> float:
            return median(steps_where(r, lambda s: s >= 3 and s not in measured, cpu=cpu))

        total, un, temp, meas = [], [], [], []
        for base, full, hook in zip(runs["none"], runs["all"], runs["temperature"]):
            base_step = unmeasured(base)
            base_times, full_times = (base.cpu_times, full.cpu_times) if cpu else (base.times, full.times)
            total.append(sum(full_times) / sum(base_times))
            un.append(unmeasured(full) / base_step)
            temp.append(unmeasured(hook) / base_step)
            # a measured step's extra time over the same run's median unmeasured step
            extra = [t - unmeasured(full) for t in steps_where(full, lambda s: s in later, cpu=cpu)]
            meas.append(median(extra) / base_step)
        step_ms = 1e3 * median([unmeasured(r) for r in runs["none"]])
        rows = [
            ("all callbacks, whole run / none", "total_ratio", total),
            ("unmeasured step, all callbacks / none", "unmeasured_ratio", un),
            ("temperature hook active, step / none", "temperature_ratio", temp),
            ("one measurement (extra time), in training steps", "measurement_steps", meas),
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
