"""Non-finite values (NaN/Inf gradients, Inf attention logits, fp16 overflow, NaN loss) never break training.

Each test runs a real Trainer with the three callbacks measuring on every step, injects the fault at one step,
and checks: no exception, the non-finite event is counted in its dedicated key, the spike detector flags it,
nothing non-finite reaches the log, and the measurements that can still be made are made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.capture.conftest import CausalSelfAttention, NanoGPT
from tests.reliability._util import (
    LM,
    InjectGrad,
    SkipNonFiniteStep,
    all_logged_finite,
    blocks,
    callbacks,
    fit,
    nonfinite_rows,
    token_data,
)

pytestmark = pytest.mark.reliability

FAULT_STEP = 3
STEPS = 6


def _counts(metrics: dict[str, dict[int, float]], key: str, step: int) -> float:
    return metrics[f"stability/{key}"][step]


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_gradient_in_one_layer(tmp_path: Path, value: float) -> None:
    param = "model.transformer.h.1.attn.c_attn.weight"
    skip = SkipNonFiniteStep()
    cbs = [InjectGrad(param, FAULT_STEP, value), *callbacks(), skip]
    _, m = fit(tmp_path, LM("demo-pre", n_layer=2, d=16, n_head=2), cbs, steps=STEPS)

    assert skip.skipped == [FAULT_STEP]
    assert all_logged_finite(m) == []
    # counted in the dedicated key, from the fault step on (a running total)
    assert _counts(m, "grad/nonfinite", FAULT_STEP - 1) == 0
    assert _counts(m, "grad/nonfinite", FAULT_STEP) == 1
    assert _counts(m, "grad/nonfinite", STEPS - 1) == 1
    # the spike detector flagged it
    assert _counts(m, "grad/spike", FAULT_STEP) == 1
    assert _counts(m, "grad/spike_count", FAULT_STEP) >= 1
    # what could be measured was: the healthy layer's norm at the fault step, everything afterwards
    assert FAULT_STEP in m["stability/grad_norm/layer_00"]
    assert FAULT_STEP not in m["stability/grad_norm/layer_01"]
    assert FAULT_STEP not in m["stability/grad_norm/global"]
    for key in ("grad_norm/layer_01", "grad_norm/global", "theta_max/layer_01", "sensitivity/layer_01"):
        assert {FAULT_STEP + 1, STEPS - 1} <= set(m[f"stability/{key}"]), key


class _InfAttention(CausalSelfAttention):
    """nanoGPT's manual-softmax attention that can put +inf into one logit of the last query row."""

    inject = False

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        causal: Any = self.bias
        att = att.masked_fill(causal[:, :, :t, :t] == 0, float("-inf"))
        if self.inject:
            att = att.clone()
            att[0, :, t - 1, 0] = math.inf  # one row per head of sample 0: softmax gives NaN there
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class _NanoLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = NanoGPT(vocab=64, n_embd=16, n_head=2, n_layer=2, block_size=8, flash=False)
        for block in blocks(self):
            block.attn.__class__ = _InfAttention

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x).reshape(-1, 64), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _InjectInfLogits(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for block in blocks(pl_module):
            block.attn.inject = trainer.global_step == FAULT_STEP and block is blocks(pl_module)[1]


def test_inf_attention_logits(tmp_path: Path) -> None:
    skip = SkipNonFiniteStep()
    cbs = [_InjectInfLogits(), *callbacks(), skip]
    _, m = fit(tmp_path, _NanoLM(), cbs, data=token_data(n=16, seq=8, batch_size=2), steps=STEPS)

    assert all_logged_finite(m) == []
    # 2 heads x 1 row of sample 0 in layer 1 (all rows are measured at rows_per_head >= the sampled count
    # only when the last row is sampled: count >= 0 then, and exactly the injected rows with rows_per_head=8)
    assert m["stability/nonfinite_rows/layer_01"][FAULT_STEP] >= 1
    assert m["stability/nonfinite_rows/layer_00"][FAULT_STEP] == 0
    assert nonfinite_rows(m, FAULT_STEP - 1) == 0
    # the rest of layer 1's rows are still measured at the fault step, and layer 0 is untouched
    assert 0.0 <= m["stability/theta_max/layer_01"][FAULT_STEP] <= 1.0
    assert FAULT_STEP in m["stability/theta_max/layer_00"]
    # the NaN output gave a NaN loss and NaN gradients: counted and flagged
    assert skip.skipped == [FAULT_STEP]
    assert m["stability/grad/nonfinite"][FAULT_STEP] == 1
    assert m["stability/grad/spike"][FAULT_STEP] == 1
    # the loss detector sees a step's loss after that step's measurement: flagged at the next one
    assert m["stability/loss/spike_count"][FAULT_STEP + 1] >= 1
    assert STEPS - 1 in m["stability/theta_max/layer_01"]


def test_inf_attention_logits_every_row_sampled(tmp_path: Path) -> None:
    """With every row sampled the count is exact: 2 heads x 1 row."""
    cbs = [_InjectInfLogits(), *callbacks(rows=8), SkipNonFiniteStep()]
    _, m = fit(tmp_path, _NanoLM(), cbs, data=token_data(n=16, seq=8, batch_size=2), steps=FAULT_STEP + 2)
    assert m["stability/nonfinite_rows/layer_01"][FAULT_STEP] == 2
    assert all_logged_finite(m) == []


def test_fp16_overflow_gradscaler_skips_steps(tmp_path: Path) -> None:
    """Real fp16 autocast + GradScaler on CPU (Trainer(precision="16-mixed") silently becomes bf16 on CPU, so
    the plugin is given explicitly). An initial scale of 2**24 overflows fp16 activation gradients: the
    scaler skips steps and halves its scale until they fit."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    t, m = fit(tmp_path, LM("demo-pre", n_layer=2, d=16, n_head=2), callbacks(), steps=12, plugins=[plugin])

    assert scaler.get_scale() < 2.0**24  # steps were skipped
    assert all_logged_finite(m) == []
    overflowed = m["stability/grad/nonfinite"][11]
    assert overflowed >= 1
    assert m["stability/grad/spike_count"][11] >= overflowed
    # measured gradients are unscaled: a tiny LM's global norm is O(1), not O(scale)
    last = max(m["stability/grad_norm/global"])
    assert 0.0 < m["stability/grad_norm/global"][last] < 100.0
    assert 11 in m["stability/theta_max/layer_00"]
    assert all(torch.isfinite(p).all() for p in t.lightning_module.parameters())


class _NaNLossLM(LM):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.trainer.global_step == FAULT_STEP else loss


def test_loss_becomes_nan_and_poisons_the_model(tmp_path: Path) -> None:
    """No skip here: AdamW writes NaN into every parameter and every later step is NaN end to end."""
    t, m = fit(tmp_path, _NaNLossLM("demo-pre", n_layer=2, d=16, n_head=2), callbacks(), steps=STEPS)

    assert t.global_step == STEPS
    assert all_logged_finite(m) == []
    assert m["stability/loss/spike_count"][FAULT_STEP + 1] >= 1
    assert m["stability/grad/spike"][FAULT_STEP] == 1
    # every later step has non-finite gradients, each counted once
    assert m["stability/grad/nonfinite"][STEPS - 1] == STEPS - FAULT_STEP
    # the poisoned forward: every sampled row is non-finite, counted per layer
    assert nonfinite_rows(m, FAULT_STEP + 1) > 0
    assert FAULT_STEP + 1 not in m.get("stability/theta_max/layer_00", {})
