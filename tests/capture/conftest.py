"""Tiny models shared by the capture tests (no downloads)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention (Karpathy's model.py), with both the flash (SDPA) and the manual softmax path."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, flash: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, dropout, flash
        self.register_buffer(
            "bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(
        self, n_embd: int, n_head: int, block_size: int, flash: bool, dropout: float, post_ln: bool
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, flash, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)
        self.post_ln = post_ln

    def forward(self, x: Tensor) -> Tensor:
        if self.post_ln:
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(
        self,
        vocab: int = 50,
        n_embd: int = 32,
        n_head: int = 4,
        n_layer: int = 2,
        block_size: int = 16,
        flash: bool = True,
        dropout: float = 0.0,
        post_ln: bool = False,
    ) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "drop": nn.Dropout(dropout),
                "h": nn.ModuleList(
                    [Block(n_embd, n_head, block_size, flash, dropout, post_ln) for _ in range(n_layer)]
                ),
                "ln_f": nn.LayerNorm(n_embd),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t)))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@pytest.fixture
def nanogpt() -> Callable[..., NanoGPT]:
    def make(seed: int = 0, **kw: object) -> NanoGPT:
        torch.manual_seed(seed)
        return NanoGPT(**kw)  # type: ignore[arg-type]

    return make


def sdpa_probs(q: Tensor, k: Tensor, **kw: object) -> Tensor:
    """Torch's own attention weights: SDPA with V = identity returns softmax(QK^T*scale + mask) exactly."""
    lk = k.shape[-2]
    eye = torch.eye(lk, dtype=q.dtype).expand(*k.shape[:-2], lk, lk)
    return F.scaled_dot_product_attention(q, k, eye, **kw)  # type: ignore[arg-type]


def mha_scaled_copy(model: nn.Module, tau: float) -> nn.Module:
    """Independent temperature route: a copy in which every ``nn.MultiheadAttention`` has its W_Q rows and
    q bias divided by tau."""
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        e = mod.embed_dim
        with torch.no_grad():
            if mod._qkv_same_embed_dim:
                assert mod.in_proj_weight is not None
                mod.in_proj_weight[:e] /= tau
            else:
                assert mod.q_proj_weight is not None
                mod.q_proj_weight /= tau
            if mod.in_proj_bias is not None:
                mod.in_proj_bias[:e] /= tau
    return ref
