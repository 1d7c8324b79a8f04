"""Post-LN vs pre-LN at laptop scale: the gradient monitor sees the paper's depth pathology (DESIGN s.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from tests.callbacks._models import MemoryLogger, trainer
from thetascope.callbacks import GradientFlowMonitor

STEPS = 61


class _ByteLM(pl.LightningModule):
    def __init__(self, norm: str, seed: int) -> None:
        super().__init__()
        from thetascope.demo.model import GPT, GPTConfig

        torch.manual_seed(seed)
        self.model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=12, n_head=4, n_embd=64, norm=norm))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x).reshape(-1, 256), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _profile(tmp: Path, norm: str, seed: int) -> dict[str, float]:
    from thetascope.demo.data import ByteWindows, load_corpus

    corpus = load_corpus(max_bytes=300_000)
    data = DataLoader(ByteWindows(corpus.train, block_size=32, n_samples=STEPS * 8, seed=seed), batch_size=8)
    logger = MemoryLogger()
    mon = GradientFlowMonitor(every_n_steps=20, log_heatmap=False, spike_action="none")
    trainer(tmp, [mon], steps=STEPS, logger=logger).fit(_ByteLM(norm, seed), data)
    last = {k: v[STEPS - 1] for k, v in logger.metrics.items() if STEPS - 1 in v}
    return {k.rsplit("/", 1)[-1]: v for k, v in last.items() if k.startswith("stability/grad/")}


def _median_profile(tmp: Path, norm: str) -> dict[str, float]:
    # Post-LN at this learning rate is chaotic: one seed's profile at step 60 can flip with the float rounding
    # of the machine (seed 1 gave an early/late ratio of 0.43 on one CPU and 3.6 on another), so each
    # placement is read as the median over three seeds.
    runs = [_profile(tmp / f"{norm}{seed}", norm, seed) for seed in (1, 2, 3)]
    return {k: float(torch.tensor([r[k] for r in runs]).median()) for k in runs[0]}


@pytest.mark.slow
def test_post_ln_starves_early_layers_pre_ln_does_not(tmp_path: Path) -> None:
    pre = _median_profile(tmp_path, "pre")
    post = _median_profile(tmp_path, "post")
    # DESIGN section 3 (300 steps, lr 1e-3): early/late ratio pre-LN ~1.76, post-LN ~0.33. This shorter run
    # (60 steps, lr 3e-3; medians over seeds 1-3 measured here: pre 1.24, post 0.0 with 8 of 12 layers
    # vanishing) shows the same direction: post-LN gradients grow with depth while the early and middle layers
    # starve, pre-LN ones stay flat.
    assert post["early_late_ratio"] < 0.8 < pre["early_late_ratio"], (pre, post)
    assert post["log_slope"] > pre["log_slope"] + 0.1, (pre, post)
