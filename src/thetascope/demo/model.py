"""A small nanoGPT-style causal language model with a switch between pre-LN and post-LN blocks.

The attention calls ``F.scaled_dot_product_attention(..., is_causal=True)`` so the thetascope capture path
(the ``"sdpa"`` route) and the temperature hook see it exactly as they would see nanoGPT. Module and parameter
names follow nanoGPT (``transformer.h.3.attn.c_attn``) so per-layer grouping by name works unchanged.

Shapes: ``B`` batch, ``L`` sequence length, ``d`` model width (``n_embd``), ``H`` heads, ``d_h = d / H``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormPlacement = Literal["pre", "post"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape and variant of :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (256 for bytes).
        block_size: longest sequence the position table holds.
        n_layer: number of transformer blocks ``N``.
        n_head: attention heads per block.
        n_embd: model width ``d`` (divisible by ``n_head``).
        norm: ``"pre"`` (LayerNorm before each sublayer, identity residual path) or ``"post"`` (LayerNorm
            after each residual addition, as in the original Transformer).
        path_length_scaling: scale each of the four attention projections at initialisation, and each
            sublayer's residual contribution, by ``N^(-1/4)`` (the path-length rule for ``m = 4`` maps; the
            DeepNorm-style fix for post-LN).
        bias: use biases in Linear layers and LayerNorms.

    Example:
        >>> GPTConfig(n_layer=2, n_embd=32, n_head=4).head_dim
        8
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 12
    n_head: int = 4
    n_embd: int = 64
    norm: NormPlacement = "pre"
    path_length_scaling: bool = False
    bias: bool = True

    def __post_init__(self) -> None:
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        """Width of one head, ``d / H``."""
        return self.n_embd // self.n_head

    @property
    def branch_scale(self) -> float:
        """Multiplier on each sublayer output: ``N^(-1/4)`` with path-length scaling, else 1."""
        return self.n_layer ** (-0.25) if self.path_length_scaling else 1.0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection (nanoGPT layout).

    Example:
        >>> attn = CausalSelfAttention(GPTConfig(n_layer=1, n_embd=16, n_head=2))
        >>> attn(torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 16])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # W_Q; W_K; W_V stacked
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W_O

    def forward(self, x: Tensor) -> Tensor:
        """Attend causally. ``x``: ``[B, L, d]`` -> ``[B, L, d]``."""
        b, seq, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # each [B, L, d]
        # [B, L, d] -> [B, H, L, d_h]
        q = q.view(b, seq, self.n_head, d // self.n_head).transpose(1, 2)
        k = k.view(b, seq, self.n_head, d // self.n_head).transpose(1, 2)
        v = v.view(b, seq, self.n_head, d // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, L, d_h]
        y = y.transpose(1, 2).contiguous().view(b, seq, d)  # [B, L, d]
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward block, ``d -> 4d -> d`` with GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L, d]`` -> ``[B, L, d]``."""
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """One transformer block; the LayerNorm placement is the only difference between the variants.

    * pre-LN:  ``x + a·attn(LN(x))`` then ``x + a·mlp(LN(x))`` — the residual stream is an identity path.
    * post-LN: ``LN(x + a·attn(x))`` then ``LN(x + a·mlp(x))`` — every gradient crosses a LayerNorm Jacobian.

    ``a`` is :attr:`GPTConfig.branch_scale`.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm = config.norm
        self.scale = config.branch_scale
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L, d]`` -> ``[B, L, d]``."""
        if self.norm == "pre":
            x = x + self.scale * self.attn(self.ln_1(x))
            return x + self.scale * self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.scale * self.attn(x))
        return self.ln_2(x + self.scale * self.mlp(x))


class GPT(nn.Module):
    """Byte-level GPT: token + position embeddings, ``n_layer`` blocks, tied output head.

    Example:
        >>> model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16))
        >>> logits = model(torch.randint(0, 256, (2, 16)))
        >>> logits.shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                # A post-LN stack already ends in a LayerNorm; a second one would change nothing useful.
                "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias)
                if config.norm == "pre"
                else nn.Identity(),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = cast(nn.Embedding, self.transformer["wte"]).weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's depth-scaled init of the residual output projections.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.path_length_scaling:
            # Path-length rule (m = 4): W_Q, W_K, W_V and W_O each shrink by N^(-1/4), so their product
            # (the sensitive path of one layer) shrinks by 1/N.
            beta = config.n_layer ** (-0.25)
            with torch.no_grad():
                for block in self.blocks:
                    block.attn.c_attn.weight.mul_(beta)
                    block.attn.c_proj.weight.mul_(beta)

    @property
    def blocks(self) -> list[Block]:
        """The transformer blocks in depth order."""
        return [cast(Block, b) for b in cast(nn.ModuleList, self.transformer["h"])]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids ``[B, L]`` (long) -> logits ``[B, L, vocab]``."""
        _, seq = idx.shape
        if seq > self.config.block_size:
            raise ValueError(f"sequence length {seq} exceeds block_size {self.config.block_size}")
        pos = torch.arange(seq, device=idx.device)  # [L]
        x = self.transformer["wte"](idx) + self.transformer["wpe"](pos)  # [B, L, d]
        for block in self.blocks:
            x = block(x)
        x = self.transformer["ln_f"](x)
        return self.lm_head(x)  # [B, L, vocab]

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats). ``idx``, ``targets``: ``[B, L]``."""
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
