"""The demo GPT against independent references: materialised causal attention and LayerNorm statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from thetascope.demo.model import GPT, CausalSelfAttention, GPTConfig, NormPlacement


def _reference_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention written out by hand: explicit masked scores, softmax, weighted sum."""
    b, seq, d = x.shape
    h = attn.n_head
    dh = d // h
    qkv = x @ attn.c_attn.weight.T + attn.c_attn.bias
    q, k, v = (t.reshape(b, seq, h, dh).permute(0, 2, 1, 3) for t in qkv.split(d, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [B, H, L, L]
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    y = (weights @ v).permute(0, 2, 1, 3).reshape(b, seq, d)
    return y @ attn.c_proj.weight.T + attn.c_proj.bias


def test_attention_matches_materialised_reference() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_layer=1, n_embd=24, n_head=3)).double()
    for p in attn.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causal_future_tokens_do_not_change_past_logits(norm: NormPlacement) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_embd=32, n_head=4, block_size=16, norm=norm)).eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_post_ln_block_outputs_are_normalised_and_pre_ln_is_residual() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32) * 5 + 3
    post = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=4, norm="post")).blocks[0]
    y = post(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 8), atol=1e-3, rtol=0)
    pre = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=4, norm="pre")).blocks[0]
    # pre-LN: the block adds a small branch to an unchanged stream (identity path), so the scale survives.
    assert (pre(x) - x).abs().mean() < 0.2 * x.abs().mean()


def test_path_length_scaling_shrinks_attention_maps_by_n_to_minus_quarter() -> None:
    n = 16
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=n, n_embd=32, n_head=4))
    torch.manual_seed(0)
    scaled = GPT(GPTConfig(n_layer=n, n_embd=32, n_head=4, path_length_scaling=True, norm="post"))
    beta = n ** (-0.25)
    for bp, bs in zip(plain.blocks, scaled.blocks):
        torch.testing.assert_close(bs.attn.c_attn.weight, bp.attn.c_attn.weight * beta)
        torch.testing.assert_close(bs.attn.c_proj.weight, bp.attn.c_proj.weight * beta)
        torch.testing.assert_close(bs.mlp.c_fc.weight, bp.mlp.c_fc.weight)
    assert scaled.config.branch_scale == pytest.approx(0.5)
    # Product of the four maps of one layer shrinks by 1/N (spectral norms of the scaled parts).
    assert beta**4 == pytest.approx(1 / n)


def test_loss_at_init_is_near_uniform_over_bytes() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16))
    idx, targets = torch.randint(0, 256, (2, 4, 16))
    # Small init: logits near zero, so the loss against unrelated targets is close to log(256).
    assert abs(model.loss(idx, targets).item() - math.log(256)) < 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"norm": "mid"}, "norm"), ({"n_embd": 30, "n_head": 4}, "divisible"), ({"n_layer": 0}, "n_layer")],
)
def test_bad_config_is_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)  # type: ignore[arg-type]


def test_too_long_sequence_is_rejected() -> None:
    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=4))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))
