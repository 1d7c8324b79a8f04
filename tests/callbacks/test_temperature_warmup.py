"""TemperatureWarmup on real Trainers: schedule per optimizer step, bitwise identity after warmup, resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from tests.callbacks._models import LM, VOCAB, read_csv_metrics, token_data, trainer
from thetascope.callbacks import TemperatureWarmup


class _Record(Callback):
    """Records the probe temperature seen by every training batch (an independent observer)."""

    def __init__(self, warmup: TemperatureWarmup) -> None:
        self.warmup = warmup
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        # the warmup callback runs before this one (list order), so this is the tau used by this batch
        self.seen.append((trainer.global_step, i, self.warmup.probe.temperature))


def _manual_attention_logits_scale(model: LM, x: torch.Tensor, tau: float) -> torch.Tensor:
    """Reference forward of the demo GPT with logits / tau, written out by hand (materialised attention)."""
    gpt = model.model
    cfg = gpt.config
    h = gpt.transformer["wte"](x) + gpt.transformer["wpe"](torch.arange(x.shape[1]))
    for block in gpt.transformer["h"]:
        a_in = block.ln_1(h)
        q, k, v = block.attn.c_attn(a_in).split(cfg.n_embd, dim=-1)
        b, length, _ = q.shape
        q, k, v = (t.view(b, length, cfg.n_head, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim) / tau
        logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, length, cfg.n_embd)
        h = h + block.attn.c_proj(y)
        h = h + block.mlp(block.ln_2(h))
    return gpt.lm_head(gpt.transformer["ln_f"](h))


def test_schedule_per_optimizer_step_with_accumulation_and_logging(tmp_path: Path) -> None:
    warm = TemperatureWarmup(tau_start=3.0, tau_end=1.0, warmup_steps=4, schedule="linear")
    rec = _Record(warm)
    t = trainer(tmp_path, [warm, rec], steps=6, accumulate_grad_batches=2)
    t.fit(LM("demo-pre"), token_data(n=48))
    expected = {s: 3.0 + (1.0 - 3.0) * min(s, 4) / 4 for s in range(6)}
    # two micro-batches per optimizer step, both with that step's tau
    assert [(s, tau) for s, _, tau in rec.seen] == [(s, expected[s]) for s in range(6) for _ in range(2)]
    logged = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")["stability/temperature"]
    assert logged == pytest.approx(expected)
    assert t.callback_metrics["stability/temperature"] == pytest.approx(1.0)
    # warmup over and tau_end == 1: no hook left on the model
    assert not warm.probe.is_installed


def test_tempered_forward_matches_hand_written_reference() -> None:
    torch.manual_seed(0)
    model = LM("demo-pre").eval()
    with torch.no_grad():  # sharpen attention so the temperature visibly matters
        for block in model.model.transformer["h"]:
            block.attn.c_attn.weight.mul_(20.0)
    warm = TemperatureWarmup(tau_start=2.5, tau_end=1.0, warmup_steps=10)
    t = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    warm.setup(t, model, "fit")
    warm._apply(0)
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        got = model(x)
        ref = _manual_attention_logits_scale(model, x, 2.5)
        untempered = _manual_attention_logits_scale(model, x, 1.0)
    assert torch.allclose(got, ref, atol=1e-5)
    assert (got - untempered).abs().max() > 100 * (got - ref).abs().max()
    warm.remove()


def test_after_warmup_outputs_are_bitwise_unhooked(tmp_path: Path) -> None:
    model = LM("demo-pre")
    warm = TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=3)
    trainer(tmp_path, [warm], steps=5, logger=None).fit(model, token_data())
    clone = copy.deepcopy(model.model)  # deepcopy carries no hooks of the probe? verify it is unhooked anyway
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        a = model.model(x)
        b = clone(x)
    assert not warm.probe.is_installed
    assert torch.equal(a, b)
    assert all(not m._forward_pre_hooks for m in model.model.modules())


def test_validation_uses_current_training_tau(tmp_path: Path) -> None:
    warm = TemperatureWarmup(tau_start=2.0, tau_end=1.0, warmup_steps=100)
    seen: list[float] = []

    class _Val(Callback):
        def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
            seen.append(warm.probe.temperature)

    t = trainer(tmp_path, [warm, _Val()], steps=4, limit_val_batches=1, val_check_interval=2, logger=None)
    t.fit(LM("demo-pre"), token_data(), token_data(n=4))
    assert seen == pytest.approx([warm.tau_at(2), warm.tau_at(4)])


def test_beside_lr_scheduler_no_monitor(tmp_path: Path) -> None:
    class _Sched(LM):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    warm = TemperatureWarmup(tau_start=2.0, tau_end=1.0, warmup_steps=3, schedule="geometric", log=False)
    module = _Sched("demo-pre")
    t = trainer(tmp_path, [warm], steps=4)
    t.fit(module, token_data())
    assert t.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.1 / 5)
    assert "stability/temperature" not in read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")


def test_resume_reproduces_tau_sequence(tmp_path: Path) -> None:
    def run(steps: int, ckpt: str | None, root: Path) -> tuple[LM, list[tuple[int, int, float]]]:
        warm = TemperatureWarmup(tau_start=4.0, tau_end=1.0, warmup_steps=8, schedule="cosine")
        rec = _Record(warm)
        model = LM("demo-pre")
        t = trainer(root, [warm, rec], steps=steps, logger=None)
        t.fit(model, token_data(n=8, batch_size=8), ckpt_path=ckpt)  # one batch per epoch: resume-safe
        if ckpt is None and steps == 5:
            t.save_checkpoint(root / "mid.ckpt")
        return model, rec.seen

    full_model, full = run(10, None, tmp_path / "a")
    _, first = run(5, None, tmp_path / "b")
    resumed_model, second = run(10, str(tmp_path / "b/mid.ckpt"), tmp_path / "c")
    assert [tau for s, _, tau in first + second] == [tau for s, _, tau in full]
    assert [s for s, _, _ in second] == list(range(5, 10))
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(resumed_model.model(x), full_model.model(x))
    loss = F.cross_entropy(full_model.model(x).reshape(-1, VOCAB), x.reshape(-1))
    assert torch.isfinite(loss)


def test_state_key_and_validation() -> None:
    a = TemperatureWarmup(tau_start=4.0, warmup_steps=10)
    b = TemperatureWarmup(tau_start=2.0, warmup_steps=10)
    assert a.state_key != b.state_key
    assert "TemperatureWarmup" in a.state_key
    with pytest.raises(ValueError, match="schedule"):
        TemperatureWarmup(schedule="exp")
    with pytest.raises(ValueError, match="tau_start"):
        TemperatureWarmup(tau_start=-1.0)
    with pytest.raises(ValueError, match="log"):
        TemperatureWarmup(log="yes")  # type: ignore[arg-type]
