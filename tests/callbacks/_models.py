"""Tiny real models wrapped in LightningModules for the callback tests (CPU, seconds per run)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 64
SEQ = 16


def token_data(
    n: int = 64, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0, batch_size: int = 4, repeat: int = 1
) -> DataLoader:
    """Deterministic (fixed seed, no shuffle) next-token data with some structure to learn.

    ``repeat > 1`` repeats the whole set (with ``n == batch_size`` every batch is the same, which makes
    mid-epoch resumption order-independent)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    step = torch.randint(1, 4, (n, 1), generator=gen)
    x = ((start + step * torch.arange(seq + 1)) % vocab).repeat(repeat, 1)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch_size, shuffle=False)


class TorchEncoderLM(nn.Module):
    """Causal LM on ``nn.TransformerEncoder`` (``norm_first`` switches pre-LN / post-LN)."""

    def __init__(self, n_layer: int = 2, d: int = 32, n_head: int = 4, norm_first: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, n_head, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        seq = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq)
        h = self.emb(idx) + self.pos[:seq]
        return self.head(self.encoder(h, mask=mask, is_causal=True))


def make_model(kind: str, n_layer: int = 2, d: int = 32, n_head: int = 4) -> nn.Module:
    """``demo-pre``/``demo-post`` (nanoGPT-style, SDPA), ``torch-pre``/``torch-post``, ``gpt2`` (HF),
    ``lightning`` (``lightning.pytorch.demos.Transformer``)."""
    if kind.startswith("demo-"):
        from thetascope.demo.model import GPT, GPTConfig

        return GPT(
            GPTConfig(
                vocab_size=VOCAB,
                block_size=SEQ,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=d,
                norm=kind.split("-")[1],
            )
        )  # type: ignore[arg-type]
    if kind.startswith("torch-"):
        return TorchEncoderLM(n_layer, d, n_head, norm_first=kind == "torch-pre")
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_positions=SEQ,
            n_embd=d,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)
    if kind == "lightning":
        from lightning.pytorch.demos import Transformer

        return Transformer(vocab_size=VOCAB, ninp=d, nhead=n_head, nhid=2 * d, nlayers=n_layer, dropout=0.0)
    raise ValueError(kind)


class LM(pl.LightningModule):
    """Next-token LM over any of :func:`make_model`'s kinds."""

    def __init__(
        self,
        kind: str = "demo-pre",
        n_layer: int = 2,
        d: int = 32,
        n_head: int = 4,
        lr: float = 3e-3,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        self.model = make_model(kind, n_layer, d, n_head)
        if compile:
            self.model = torch.compile(self.model, backend="eager")  # type: ignore[assignment]
        self.lr = lr

    def forward(self, idx: Tensor, target: Tensor | None = None) -> Tensor:
        if self.kind == "gpt2":
            return self.model(idx).logits
        if self.kind == "lightning":
            return self.model(idx, target if target is not None else idx).view(idx.shape[0], idx.shape[1], -1)
        return self.model(idx)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x, y)
        if self.kind == "lightning":
            loss = F.nll_loss(out.reshape(-1, VOCAB), y.reshape(-1))
        else:
            loss = F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x, y).reshape(-1, VOCAB), y.reshape(-1)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TwoOptLM(LM):
    """Manual optimization with two optimizers: embeddings+head, and the blocks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:  # type: ignore[override]
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        x, y = batch
        loss = F.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()
        return loss.detach()

    def configure_optimizers(self) -> Any:  # type: ignore[override]
        blocks = [p for n, p in self.named_parameters() if ".h." in n]
        ids = {id(p) for p in blocks}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return torch.optim.AdamW(rest, lr=self.lr), torch.optim.AdamW(blocks, lr=self.lr)


def trainer(
    tmp: Path, callbacks: list[Any], steps: int = 6, logger: Any = "csv", **kwargs: Any
) -> pl.Trainer:
    """A quiet CPU Trainer; ``logger`` is ``"csv"``, ``"tb"``, ``"both"``, ``None`` or a logger object."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if logger == "csv":
        logger = CSVLogger(tmp, name="csv", version=0)
    elif logger == "tb":
        logger = TensorBoardLogger(tmp, name="tb", version=0)
    elif logger == "both":
        logger = [CSVLogger(tmp, name="csv", version=0), TensorBoardLogger(tmp, name="tb", version=0)]
    elif logger is None:
        logger = False
    opts: dict[str, Any] = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    opts.update(kwargs)
    return pl.Trainer(default_root_dir=tmp, callbacks=callbacks, logger=logger, **opts)


def read_csv_metrics(path: Path) -> dict[str, dict[int, float]]:
    """``metrics.csv`` -> key -> {step: value} (empty cells skipped)."""
    out: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                out.setdefault(k, {})[step] = float(v)
    return out


def read_tb_scalars(logdir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """TensorBoard event files -> (scalar key -> {step: value}, image tags)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    return scalars, list(tags["images"])


def demo_reference(gpt: nn.Module, x: Tensor) -> list[dict[str, Tensor]]:
    """Materialised attention of the demo pre-LN GPT, written out by hand: per layer the probabilities
    ``[B, H, L, L]``, the attention input (``ln_1`` output) and the residual stream entering the block."""
    import math as _math

    cfg = gpt.config
    out = []
    with torch.no_grad():
        h = gpt.transformer["wte"](x) + gpt.transformer["wpe"](torch.arange(x.shape[1]))
        for block in gpt.transformer["h"]:
            a_in = block.ln_1(h)
            q, k, v = block.attn.c_attn(a_in).split(cfg.n_embd, dim=-1)
            b, length, _ = q.shape
            q, k, v = (t.view(b, length, cfg.n_head, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
            logits = q @ k.transpose(-1, -2) / _math.sqrt(cfg.head_dim)
            logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
            probs = logits.softmax(-1)
            out.append({"probs": probs, "attn_input": a_in, "residual": h})
            y = (probs @ v).transpose(1, 2).reshape(b, length, cfg.n_embd)
            h = h + block.attn.c_proj(y)
            h = h + block.mlp(block.ln_2(h))
    return out


def exhaustive_theta(probs: Tensor) -> Tensor:
    """theta(p) = 4 max_S p(S)(1 - p(S)) by enumerating every subset (float64; last dim <= 16)."""
    p = probs.double().reshape(-1, probs.shape[-1])
    n = p.shape[-1]
    masks = ((torch.arange(2**n).unsqueeze(1) >> torch.arange(n)) & 1).double()  # [2^n, n]
    best = torch.empty(p.shape[0], dtype=torch.float64)
    for start in range(0, p.shape[0], 64):
        s = p[start : start + 64] @ masks.T
        best[start : start + 64] = (4 * s * (1 - s)).amax(-1)
    return best.reshape(probs.shape[:-1])


class MemoryLogger(pl.loggers.Logger):
    """Keeps every ``log_metrics`` call in memory (fast; no files): key -> {step: value}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, {})[int(step or 0)] = float(v)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, dict):
            self.hparams.update(params)
