"""Overhead of the thetascope callbacks on a real Lightning training loop (small GPT-like model).

Three configurations are trained in the same process, interleaved and repeated, with the same model, data and
seed: no callbacks, the two monitors, and all three callbacks (TemperatureWarmup kept mid-warmup, so its hook
is active on every step). ``every_n_steps=50``: steps 50 and 100 are measurement steps (step 0 is left out: it
also holds the cold power iteration and first-call allocations). Printed: step times (min over repeats of
the per-run median; fastest measured step) and their ratios to the bare run for unmeasured steps, measured
steps, and amortised over one interval (``unmeasured + (measured - unmeasured) / every_n_steps``).
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch

STEPS = 101
EVERY = 50
REPEATS = 3


def _module() -> Any:
    import lightning.pytorch as pl
    import torch.nn.functional as F

    from thetascope.demo.model import GPT, GPTConfig

    class _LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.model(x).reshape(-1, 256), y.reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return _LM()


def _run(config: str, steps: int = STEPS) -> list[float]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup

    starts: dict[int, float] = {}
    times: list[float] = []

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class _Start(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            sync()
            starts[trainer.global_step] = time.perf_counter()

    class _End(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            sync()
            times.append(time.perf_counter() - starts[trainer.global_step - 1])

    cbs: list[Callback] = [_Start()]
    if config in ("monitors", "all"):
        cbs += [AttentionSensitivityMonitor(every_n_steps=EVERY), GradientFlowMonitor(every_n_steps=EVERY)]
    if config == "all":
        cbs.append(TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=10 * steps))
    cbs.append(_End())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (steps * 8, 65), generator=gen)
    data = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=cbs,
    )
    trainer.fit(_module(), data)
    return times


def main() -> None:
    """Print step-time ratios (callbacks / none) for unmeasured, measured and amortised steps."""
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {device}; GPT 4x64, B=8, L=64; {STEPS} steps, every_n_steps={EVERY}, {REPEATS} repeats")
    configs = ("none", "monitors", "all")
    runs: dict[str, list[list[float]]] = {c: [] for c in configs}
    _run("all", steps=6)  # warm-up: first-call costs (allocator, lazy imports, kernels) land here
    for _ in range(REPEATS):
        for c in configs:  # interleaved, so slow drifts of the machine hit every configuration alike
            runs[c].append(_run(c))
    measured = {EVERY, 2 * EVERY}

    def stats(c: str) -> tuple[float, float, float]:
        # per repeat: median of the unmeasured steps; across repeats the minimum (the least disturbed run);
        # measured steps: the fastest one. Robust on a noisy shared machine.
        un = min(
            statistics.median(t for s, t in enumerate(r) if s >= 5 and s not in measured) for r in runs[c]
        )
        me = min(t for r in runs[c] for s, t in enumerate(r) if s in measured)
        # amortised over one interval of every_n_steps
        return un, me, un + (me - un) / EVERY

    base = stats("none")
    print(
        f"{'config':<10} {'unmeasured ms':>14} {'ratio':>7} {'measured ms':>12} {'ratio':>7} "
        f"{'amortised ms':>13} {'ratio':>7}"
    )
    for c in configs:
        un, me, am = stats(c)
        print(
            f"{c:<10} {1e3 * un:>14.2f} {un / base[0]:>7.3f} {1e3 * me:>12.2f} {me / base[1]:>7.3f} "
            f"{1e3 * am:>13.2f} {am / base[2]:>7.3f}"
        )


if __name__ == "__main__":
    main()
