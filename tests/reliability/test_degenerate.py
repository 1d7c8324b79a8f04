"""Degenerate batches: length-1 sequences, an all-padding sample, batch size 1, lengths changing every step,
and an empty validation loop. No exception, nothing non-finite logged, and measurements still happen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from tests.reliability._util import LM, all_logged_finite, callbacks, fit, token_data

pytestmark = pytest.mark.reliability

STEPS = 4


def _measured_every_step(m: dict[str, dict[int, float]], layers: int = 2) -> None:
    for i in range(layers):
        assert set(m[f"stability/grad_norm/layer_{i:02d}"]) == set(range(STEPS)), i
    assert set(m["stability/grad_norm/global"]) == set(range(STEPS))


def test_sequence_length_one(tmp_path: Path) -> None:
    _, m = fit(
        tmp_path, LM("demo-pre", n_layer=2, d=16, n_head=2), callbacks(), token_data(n=8, seq=1), STEPS
    )
    assert all_logged_finite(m) == []
    _measured_every_step(m)
    # one key per row: theta of a one-hot row is exactly 0, entropy 0
    assert m["stability/theta_max/layer_00"][STEPS - 1] == 0.0
    assert m["stability/entropy/layer_01"][STEPS - 1] == pytest.approx(0.0, abs=1e-6)


def test_batch_size_one(tmp_path: Path) -> None:
    _, m = fit(
        tmp_path,
        LM("demo-pre", n_layer=2, d=16, n_head=2),
        callbacks(),
        token_data(n=8, seq=8, batch_size=1),
        STEPS,
    )
    assert all_logged_finite(m) == []
    _measured_every_step(m)
    assert set(m["stability/theta_max/layer_01"]) == set(range(STEPS))


class _Ragged(torch.utils.data.Dataset):
    """Batches whose sequence length changes every step (1, 8, 3, 16, 5, ...)."""

    LENGTHS = (1, 8, 3, 16, 5, 2)

    def __len__(self) -> int:
        return len(self.LENGTHS)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(i)
        x = torch.randint(0, 64, (2, self.LENGTHS[i] + 1), generator=gen)
        return x[:, :-1], x[:, 1:]


def test_sequence_length_changes_every_step(tmp_path: Path) -> None:
    data = DataLoader(_Ragged(), batch_size=None)
    steps = len(_Ragged.LENGTHS)
    _, m = fit(tmp_path, LM("demo-pre", n_layer=2, d=16, n_head=2), callbacks(rows=4), data, steps)
    assert all_logged_finite(m) == []
    assert set(m["stability/theta_max/layer_00"]) == set(range(steps))
    assert set(m["stability/grad_norm/global"]) == set(range(steps))


class _BertLM(pl.LightningModule):
    """Tiny HF BERT, masked-token loss over real (non-padding) tokens only; sample 0 is all padding."""

    def __init__(self, attn: str) -> None:
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        cfg._attn_implementation = attn
        self.model = BertForMaskedLM(cfg)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, mask = batch
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        labels = ids.masked_fill(mask == 0, -100)  # padding carries no loss
        return F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_all_padding_sample_in_bert(tmp_path: Path, attn: str) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (8, 8), generator=gen)
    mask = torch.ones(8, 8, dtype=torch.long)
    mask[0::2] = 0  # samples 0, 2, 4, 6 are all padding: the first of every batch of 2
    mask[1::2, 5:] = 0  # and the others end in padding
    data = DataLoader(TensorDataset(ids, mask), batch_size=2)
    t, m = fit(tmp_path, _BertLM(attn), callbacks(rows=8), data, STEPS)
    assert all_logged_finite(m) == []
    assert set(m["stability/theta_max/layer_00"]) == set(range(STEPS))
    assert set(m["stability/grad_norm/global"]) == set(range(STEPS))
    assert all(torch.isfinite(p).all() for p in t.lightning_module.parameters())


def test_empty_validation_loop(tmp_path: Path) -> None:
    empty = DataLoader(
        TensorDataset(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8, dtype=torch.long))
    )
    model = LM("demo-pre", n_layer=2, d=16, n_head=2)
    t = pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=callbacks(),
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        val_check_interval=2,
        num_sanity_val_steps=2,
    )
    t.fit(model, token_data(n=16, seq=8, batch_size=2), empty)
    t.validate(model, empty)
    assert t.global_step == STEPS
