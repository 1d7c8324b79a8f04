"""CurvatureMonitor in real Lightning runs: edge of stability, untouched training, keys, resume, refusals."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from tests.callbacks._models import LM, MemoryLogger, read_csv_metrics, token_data, trainer
from tests.helpers.threads import single_thread
from thetascope.callbacks import CurvatureMonitor

P = "stability/curvature/"
__all__ = ["single_thread"]  # autouse: one intra-op thread (tiny tensors; a loaded 2-core machine)


class _SameBatch(IterableDataset):  # type: ignore[type-arg]
    """The full data set as one batch, ``n`` times: full-batch gradient descent."""

    def __init__(self, x: Tensor, y: Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.n):
            yield self.x, self.y


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 0.25, opt: str = "sgd", dropout: float = 0.0, bn: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(4, 32)]
        if bn:
            layers.append(nn.BatchNorm1d(32))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)]
        self.net = nn.Sequential(*layers)
        self.lr, self.opt = lr, opt

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _regression(n: int) -> DataLoader:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(2 * x @ torch.randn(4, 1, generator=g))
    return DataLoader(_SameBatch(x, y, n), batch_size=None)


def test_full_batch_gd_reaches_the_edge_of_stability(tmp_path: Path) -> None:
    lr, steps = 0.25, 500
    cb = CurvatureMonitor(every_n_steps=25, iters=10, trace_samples=0, strict=True)
    logger = MemoryLogger()
    trainer(tmp_path, [cb], steps=steps, logger=logger).fit(Regressor(lr), _regression(steps))
    sharp = [v for _, v in sorted(logger.metrics[f"{P}sharpness"].items())]
    ratio = [v for _, v in sorted(logger.metrics[f"{P}stability_ratio"].items())]
    assert len(sharp) == steps // 25
    assert ratio[0] < 0.8  # starts below 2/lr ...
    assert max(ratio) > 0.95  # ... rises to it (progressive sharpening) ...
    late = sharp[-6:]
    assert all(abs(s - 2 / lr) <= 0.2 * (2 / lr) for s in late), late  # ... and settles within 20 %
    assert logger.metrics[f"{P}threshold"][0] == pytest.approx(2 / lr)


def _fit(
    tmp: Path, cb: CurvatureMonitor | None, steps: int = 6
) -> tuple[Regressor, pl.Trainer, MemoryLogger]:
    module = Regressor(lr=1e-2, opt="adamw", dropout=0.2, bn=True)
    logger = MemoryLogger()
    t = trainer(tmp, [cb] if cb else [], steps=steps, logger=logger)
    torch.manual_seed(1)
    t.fit(module, _regression(steps))
    return module, t, logger


def test_training_is_bitwise_unchanged(tmp_path: Path) -> None:
    cb = CurvatureMonitor(every_n_steps=2, iters=4, trace_samples=2, train_mode=True, strict=True)
    with_cb, t_a, log_a = _fit(tmp_path / "a", cb)
    rng_a = torch.get_rng_state()
    without, t_b, log_b = _fit(tmp_path / "b", None)
    rng_b = torch.get_rng_state()
    assert all(torch.equal(p, q) for p, q in zip(with_cb.parameters(), without.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(with_cb.buffers(), without.buffers()))
    sa, sb = t_a.optimizers[0].state_dict()["state"], t_b.optimizers[0].state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(rng_a, rng_b)
    assert log_a.metrics["train_loss"] == log_b.metrics["train_loss"]  # the probe loss was not logged
    assert sorted(log_a.metrics[f"{P}sharpness"]) == [0, 2, 4]
    assert f"{P}precond_sharpness" in log_a.metrics
    assert f"{P}taylor_ratio" in log_a.metrics


def test_keys_backend_and_accumulation_on_a_transformer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cb = CurvatureMonitor(every_n_steps=2, iters=6, trace_samples=2, batch="fixed", strict=True)
    t = trainer(tmp_path, [cb], steps=4, logger="csv", accumulate_grad_batches=2)
    with caplog.at_level("INFO"):
        t.fit(LM("demo-pre", d=16, n_head=2), token_data(n=32, batch_size=4))
    assert cb.core.backend == "math_sdpa"
    assert sum("SDPA's math kernel" in r.message for r in caplog.records) == 1
    metrics = read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert sorted(metrics[f"{P}sharpness"]) == [0, 2]  # optimizer steps only, not micro-batches
    for key in (
        "trace/layer_00",
        "trace/layer_01",
        "trace_type/attn_q",
        "trace_type/ffn",
        "trace_type/norm",
        "trace_type/embedding",
        "taylor_first",
        "loss_change",
        "stability_ratio",
        "threshold",
    ):
        assert f"{P}{key}" in metrics, key
    assert "stability/curvature/stability_ratio" in t.callback_metrics


def test_resume_restores_warm_start_vectors(tmp_path: Path) -> None:
    first = CurvatureMonitor(every_n_steps=2, iters=5, trace_samples=0, batch="fixed", strict=True)
    data = token_data(n=8, batch_size=8, repeat=10)
    t = trainer(tmp_path / "a", [first], steps=4, logger=None)
    t.fit(LM("demo-pre", d=16, n_head=2), data)
    t.save_checkpoint(tmp_path / "step4.ckpt")
    saved = {k: v.clone() for k, v in first.core.vectors.items()}
    assert set(saved) == {"sharpness", "precond"}

    seen: dict[str, Any] = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen["vectors"] = resumed.core.vectors
            seen["count"] = resumed.core.count
            seen["batch"] = resumed._probe_batch

    resumed = CurvatureMonitor(every_n_steps=2, iters=5, trace_samples=0, batch="fixed", strict=True)
    t2 = trainer(tmp_path / "b", [resumed, Spy()], steps=6, logger=None)
    t2.fit(LM("demo-pre", d=16, n_head=2), data, ckpt_path=str(tmp_path / "step4.ckpt"))
    assert seen["count"] == first.core.count == 2
    assert all(torch.equal(seen["vectors"][k], saved[k].cpu()) for k in saved)
    assert torch.equal(seen["batch"][0], first._probe_batch[0])


def test_sharded_strategies_and_bad_arguments_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    cb = CurvatureMonitor()
    fake = types.SimpleNamespace(strategy=FSDPStrategy(), global_rank=0)
    with pytest.raises(RuntimeError, match=r"FSDPStrategy.*shard"):
        cb.setup(fake, LM("demo-pre", d=16, n_head=2), "fit")  # type: ignore[arg-type]
    for kwargs in ({"every_n_steps": 0}, {"batch": "random"}, {"loss_fn": 3}, {"iters": 0}, {"backend": "x"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            CurvatureMonitor(**kwargs)  # type: ignore[arg-type]
    assert CurvatureMonitor(batch="fixed").state_key != CurvatureMonitor().state_key


def test_unmeasured_steps_cost_nothing(tmp_path: Path) -> None:
    from tests.helpers.sync import SyncSpy

    cb = CurvatureMonitor(every_n_steps=100, iters=2, trace_samples=0)
    calls: list[str] = []
    for hook in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"):
        fn = getattr(cb, hook)

        def spied(trainer: pl.Trainer, *args: Any, __fn: Any = fn) -> Any:
            if trainer.global_step == 0 or cb._pending is not None:  # step 0, measured after its update
                return __fn(trainer, *args)
            with SyncSpy() as spy:
                out = __fn(trainer, *args)
            calls.extend(spy.calls)
            return out

        setattr(cb, hook, spied)
    t = trainer(tmp_path, [cb], steps=5, logger=None)
    t.fit(LM("demo-pre", d=16, n_head=2), token_data())
    assert cb.core.count == 1  # step 0 only
    assert calls == []
