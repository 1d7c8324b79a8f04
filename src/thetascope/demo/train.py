"""The demo's training: a Lightning module around :class:`~thetascope.demo.model.GPT`, presets, and the runs.

Seven runs share data order, seed and learning rate and differ in one thing each:

* ``pre_ln-no_warmup``, ``pre_ln-lr_warmup``, ``pre_ln-temp_warmup``
* ``post_ln-no_warmup``, ``post_ln-lr_warmup``, ``post_ln-temp_warmup``
* ``post_ln-path_length`` (post-LN with the ``N^(-1/4)`` path-length scaling, no warmup)

"temp_warmup" replaces LR warmup by attention-temperature warmup (tau 4 -> 1, geometric); it is not added
to it. Each run writes a CSV log (``<out>/<run>/metrics.csv``) and a TensorBoard log (``<out>/<run>/tb/``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from thetascope.demo.data import ByteWindows, Corpus, load_corpus
from thetascope.demo.model import GPT, GPTConfig

WarmupKind = Literal["none", "lr", "temperature"]


@dataclass(frozen=True)
class Preset:
    """Model shape and training budget of one demo size.

    Example:
        >>> PRESETS["smoke"].n_layer
        2
    """

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    max_steps: int
    lr: float
    warmup_steps: int
    measure_every: int  # callback interval (optimizer steps)
    val_every: int  # validation interval (optimizer steps)
    val_batches: int
    corpus_bytes: int
    rows_per_head: int = 32
    log_every: int = 1
    precision: str = "32-true"
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "smoke",
            n_layer=2,
            n_embd=32,
            n_head=2,
            block_size=32,
            batch_size=8,
            max_steps=16,
            lr=3e-3,
            warmup_steps=8,
            measure_every=4,
            val_every=8,
            val_batches=2,
            corpus_bytes=200_000,
            rows_per_head=8,
            description="seconds; for tests and a first look",
        ),
        Preset(
            "default",
            n_layer=12,
            n_embd=64,
            n_head=4,
            block_size=64,
            batch_size=8,
            max_steps=300,
            lr=2e-3,
            warmup_steps=100,
            measure_every=10,
            val_every=100,
            val_batches=4,
            corpus_bytes=2_000_000,
            description="12 layers, d=64: a few minutes on 2 CPU cores",
        ),
        Preset(
            "gpu",
            n_layer=12,
            n_embd=512,
            n_head=8,
            block_size=256,
            batch_size=32,
            max_steps=1500,
            lr=1e-3,
            warmup_steps=500,
            measure_every=25,
            val_every=250,
            val_batches=8,
            corpus_bytes=8_000_000,
            rows_per_head=64,
            log_every=5,
            precision="bf16-mixed",
            description="12 layers, d=512, L=256: minutes on one GPU",
        ),
        Preset(
            "gpt2",
            n_layer=12,
            n_embd=768,
            n_head=12,
            block_size=1024,
            batch_size=8,
            max_steps=3000,
            lr=6e-4,
            warmup_steps=700,
            measure_every=50,
            val_every=500,
            val_batches=8,
            corpus_bytes=8_000_000,
            rows_per_head=64,
            log_every=10,
            precision="bf16-mixed",
            description="GPT-2 124M shapes (12 layers, d=768, 12 heads, L=1024): one GPU",
        ),
    )
}


@dataclass(frozen=True)
class Variant:
    """One demo run: LayerNorm placement, warmup kind and residual scaling.

    Example:
        >>> Variant("x", norm="post", warmup="lr").path_length_scaling
        False
    """

    name: str
    norm: Literal["pre", "post"]
    warmup: WarmupKind
    path_length_scaling: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("pre_ln-no_warmup", "pre", "none"),
    Variant("pre_ln-lr_warmup", "pre", "lr"),
    Variant("pre_ln-temp_warmup", "pre", "temperature"),
    Variant("post_ln-no_warmup", "post", "none"),
    Variant("post_ln-lr_warmup", "post", "lr"),
    Variant("post_ln-temp_warmup", "post", "temperature"),
    Variant("post_ln-path_length", "post", "none", path_length_scaling=True),
)


def get_variants(names: Sequence[str] | None) -> list[Variant]:
    """The variants named (all when ``names`` is empty or None), in the canonical order.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).

    Example:
        >>> [v.name for v in get_variants(["post_ln-lr_warmup"])]
        ['post_ln-lr_warmup']
    """
    if not names:
        return list(VARIANTS)
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(known)}")
    return [v for v in VARIANTS if v.name in set(names)]


class DemoLM(L.LightningModule):
    """Next-byte language modelling with AdamW and an optional linear LR warmup (``LambdaLR``, per step).

    Logs ``train/loss`` every step it is asked to and ``val/loss`` per validation run.

    Example:
        >>> lm = DemoLM(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8), lr=1e-3)
        >>> lm.model.config.n_layer
        1
    """

    def __init__(
        self,
        config: GPTConfig,
        lr: float,
        warmup_steps: int = 0,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"config": asdict(config), "lr": lr, "warmup_steps": warmup_steps})
        self.model = GPT(config)
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.betas = betas

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``[B, L, 256]`` for byte ids ``[B, L]``."""
        return self.model(idx)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One language-modelling step."""
        x, y = batch
        loss = self.model.loss(x, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Held-out loss (files never seen in training)."""
        x, y = batch
        self.log("val/loss", self.model.loss(x, y), on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        """AdamW (no decay on biases, norms, embeddings' 1-D params) with an optional per-step LR warmup."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=self.betas,
        )
        if self.warmup_steps <= 0:
            return opt
        warm = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LineProgress(L.Callback):
    """A dependency-free progress line: rewritten in place on a terminal, a few plain lines otherwise.

    Example:
        >>> LineProgress("run", total=10).label
        'run'
    """

    def __init__(self, label: str, total: int, stream: Any = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = 0.0
        self._last_print = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        every = 1 if self.tty else max(self.total // 5, 1)
        if step % every and step != self.total:
            return
        self._print(trainer, step, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, trainer.global_step, final=True)

    def _print(self, trainer: L.Trainer, step: int, final: bool) -> None:
        if step == self._last_print and not final:
            return
        self._last_print = step
        elapsed = time.perf_counter() - self._start
        loss = trainer.callback_metrics.get("train/loss")
        loss_s = f" loss {float(loss):.3f}" if loss is not None else ""
        width = 24
        filled = int(width * min(step, self.total) / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = f"  {self.label:<27} [{bar}] {step:>5}/{self.total}{loss_s}  {elapsed:5.1f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        elif final or step != self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


def stability_callbacks(preset: Preset, variant: Variant) -> tuple[list[L.Callback], list[str]]:
    """The thetascope callbacks for one run, and a list of the ones that could not be created (with why).

    A missing or failing callback never stops the demo: the report then says which keys are absent.
    """
    made: list[L.Callback] = []
    missing: list[str] = []
    try:
        from thetascope import callbacks as cb
    except Exception as exc:  # pragma: no cover - depends on the installed tree
        return made, [f"thetascope.callbacks ({type(exc).__name__}: {exc})"]

    def _try(name: str, **kwargs: Any) -> None:
        cls = getattr(cb, name, None)
        if cls is None:
            missing.append(f"{name} (not in thetascope.callbacks)")
            return
        try:
            made.append(cls(**kwargs))
        except Exception as exc:
            missing.append(f"{name} ({type(exc).__name__}: {exc})")

    _try(
        "AttentionSensitivityMonitor", every_n_steps=preset.measure_every, rows_per_head=preset.rows_per_head
    )
    # Spikes are counted and shown in the report; a warning per spike would drown the progress lines.
    _try("GradientFlowMonitor", every_n_steps=preset.measure_every, spike_action="none")
    if variant.name in ("pre_ln-no_warmup", "post_ln-no_warmup"):
        # Curvature for the pre-LN vs post-LN pair only, three times a run: one measurement costs about 35
        # training steps (benchmarks/bench_curvature.py), about +10 % on the default preset's 7 x 300 steps.
        _try("CurvatureMonitor", every_n_steps=max(preset.max_steps // 3, 1), iters=8, trace_samples=2)
    if variant.warmup == "temperature":
        _try(
            "TemperatureWarmup",
            tau_start=4.0,
            tau_end=1.0,
            warmup_steps=preset.warmup_steps,
            schedule="geometric",
        )
    return made, missing


def _loaders(preset: Preset, corpus: Corpus, seed: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    train = ByteWindows(corpus.train, preset.block_size, preset.max_steps * preset.batch_size, seed=seed)
    val = ByteWindows(corpus.val, preset.block_size, preset.val_batches * preset.batch_size, seed=seed + 1)
    return (
        DataLoader(train, batch_size=preset.batch_size, shuffle=False, drop_last=True),
        DataLoader(val, batch_size=preset.batch_size, shuffle=False),
    )


def train_variant(
    preset: Preset,
    variant: Variant,
    corpus: Corpus,
    out: Path,
    *,
    seed: int = 0,
    accelerator: str = "auto",
    label: str | None = None,
    with_callbacks: bool = True,
) -> tuple[Path, list[str]]:
    """Train one variant; return its run directory and the callbacks that were missing.

    Example:
        >>> import tempfile
        >>> from thetascope.demo.data import load_corpus
        >>> run_dir, _ = train_variant(PRESETS["smoke"], VARIANTS[0], load_corpus(200_000),
        ...                            Path(tempfile.mkdtemp()))  # doctest: +SKIP
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    L.seed_everything(seed, workers=True, verbose=False)
    config = GPTConfig(
        block_size=preset.block_size,
        n_layer=preset.n_layer,
        n_head=preset.n_head,
        n_embd=preset.n_embd,
        norm=variant.norm,
        path_length_scaling=variant.path_length_scaling,
    )
    module = DemoLM(config, lr=preset.lr, warmup_steps=preset.warmup_steps if variant.warmup == "lr" else 0)
    callbacks, missing = stability_callbacks(preset, variant) if with_callbacks else ([], [])
    callbacks.append(LineProgress(label or variant.name, preset.max_steps))
    # CSV in <out>/<run>/, TensorBoard events in <out>/<run>/tb/ (apart, so their hparams.yaml do not clash).
    loggers = [
        CSVLogger(save_dir=str(out), name=variant.name, version=""),
        TensorBoardLogger(
            save_dir=str(out), name=variant.name, version="", sub_dir="tb", default_hp_metric=False
        ),
    ]
    train_dl, val_dl = _loaders(preset, corpus, seed)
    trainer = L.Trainer(
        max_steps=preset.max_steps,
        accelerator=accelerator,
        devices=1,
        precision=preset.precision,  # type: ignore[arg-type]
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=preset.log_every,
        val_check_interval=preset.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=preset.val_batches,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    return out / variant.name, missing


def run_demo(
    preset: Preset | str = "default",
    out: Path | str = "runs",
    *,
    variants: Sequence[str] | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    max_steps: int | None = None,
    stream: Any = None,
) -> list[Path]:
    """Train every variant of ``preset`` into ``out`` and return the run directories (report not included).

    Example:
        >>> run_demo("smoke", "/tmp/ts-demo", variants=["pre_ln-no_warmup"])  # doctest: +SKIP
    """
    stream = stream if stream is not None else sys.stdout
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"--steps must be >= 1, got {max_steps}")
        p = replace(
            p,
            max_steps=max_steps,
            warmup_steps=min(p.warmup_steps, max(max_steps // 3, 1)),
            val_every=min(p.val_every, max_steps),  # Lightning refuses an interval beyond the epoch
        )
    chosen = get_variants(variants)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(p.corpus_bytes)
    n_params = sum(t.numel() for t in GPT(_config_of(p)).parameters())
    print(
        f"thetascope demo: preset {p.name!r} ({p.n_layer} layers, d={p.n_embd}, {p.n_head} heads, "
        f"L={p.block_size}, batch {p.batch_size}, {p.max_steps} steps, lr {p.lr:g}, "
        f"{n_params / 1e6:.2f}M params)",
        file=stream,
    )
    print(f"  corpus: {corpus.describe()}", file=stream)
    runs: list[Path] = []
    all_missing: set[str] = set()
    for i, v in enumerate(chosen, 1):
        with quiet_lightning():
            run_dir, missing = train_variant(
                p, v, corpus, out, seed=seed, accelerator=accelerator, label=f"[{i}/{len(chosen)}] {v.name}"
            )
        all_missing.update(missing)
        runs.append(run_dir)
    if all_missing:
        print("  callbacks not available, their keys will be missing:", file=stream)
        for m in sorted(all_missing):
            print(f"    - {m}", file=stream)
    return runs


@contextlib.contextmanager
def quiet_lightning(
    loggers: Sequence[str] = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"),
    level: int = logging.WARNING,
    ignore: Sequence[str] | None = (".*does not have many workers.*", ".*LeafSpec.*", ".*litlogger.*"),
) -> Iterator[None]:
    """Keep the console to the progress lines: raise ``loggers`` to ``level`` and ignore the warnings whose
    message matches a pattern of ``ignore`` (every warning for ``None``).

    Logger levels and warning filters are restored on exit (the demo and the benchmarks also run inside test
    sessions, whose later tests check warnings and log records).
    """
    levels = {n: logging.getLogger(n).level for n in loggers}
    with warnings.catch_warnings():
        if ignore is None:
            warnings.simplefilter("ignore")
        else:
            for pattern in ignore:
                warnings.filterwarnings("ignore", message=pattern)
        for n in loggers:
            logging.getLogger(n).setLevel(level)
        try:
            yield
        finally:
            for n, lvl in levels.items():
                logging.getLogger(n).setLevel(lvl)


def _config_of(p: Preset) -> GPTConfig:
    return GPTConfig(block_size=p.block_size, n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd)


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of the demo's linear warmup at optimizer step ``step`` (for docs and tests).

    Example:
        >>> lr_at(0, 1.0, 4), lr_at(10, 1.0, 4)
        (0.25, 1.0)
    """
    return lr if warmup_steps <= 0 else lr * min(1.0, (step + 1) / warmup_steps)


__all__ = [
    "PRESETS",
    "VARIANTS",
    "DemoLM",
    "LineProgress",
    "Preset",
    "Variant",
    "get_variants",
    "lr_at",
    "run_demo",
    "stability_callbacks",
    "train_variant",
]
