"""DyT / Derf against their formulas, and convert_layernorm on a real model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from thetascope.demo.model import GPT, GPTConfig
from thetascope.nn import Derf, DyT, convert_layernorm, is_tanh_like


def _randomise(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    m.requires_grad_(False)


def test_dyt_matches_its_formula_elementwise() -> None:
    torch.manual_seed(0)
    m = DyT((3, 4)).double()
    _randomise(m)
    x = torch.randn(5, 3, 4, dtype=torch.float64) * 3
    a = float(m.alpha)
    ref = [
        [[float(m.weight[i, j]) * math.tanh(a * float(x[b, i, j])) + float(m.bias[i, j]) for j in range(4)]
         for i in range(3)]
        for b in range(5)
    ]  # fmt: skip
    assert torch.allclose(m(x), torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_derf_matches_its_formula_elementwise() -> None:
    torch.manual_seed(1)
    m = Derf(6).double()
    _randomise(m)
    x = torch.randn(4, 6, dtype=torch.float64) * 2
    a, s = float(m.alpha), float(m.shift)
    ref = [
        [float(m.weight[j]) * math.erf(a * float(x[b, j]) + s) + float(m.bias[j]) for j in range(6)]
        for b in range(4)
    ]
    assert torch.allclose(m(x), torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_defaults_flags_and_validation() -> None:
    assert DyT(4).alpha.tolist() == Derf(4).alpha.tolist() == [0.5]
    assert Derf(4).shift.tolist() == [0.0]
    assert DyT(4, bias=False).bias is None
    m = DyT(4, elementwise_affine=False)
    assert m.weight is None
    assert [n for n, _ in m.named_parameters()] == ["alpha"]
    x = torch.randn(2, 4)
    assert torch.equal(m(x), torch.tanh(0.5 * x))
    for bad in (dict(normalized_shape=0), dict(normalized_shape=4, alpha_init=0.0)):
        with pytest.raises(ValueError):
            DyT(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "extra"), [("dyt", 1), ("derf", 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_convert_layernorm_counts_copies_and_stays_finite(kind: str, extra: int, bias: bool) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_embd=16, n_head=2, block_size=8, bias=bias))
    with torch.no_grad():
        model.blocks[1].ln_2.weight.fill_(1.5)
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert n_ln == 7  # two per block and the final one
    before = sum(p.numel() for p in model.parameters())
    assert convert_layernorm(model, kind) is model
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sum(is_tanh_like(m) for m in model.modules()) == n_ln
    assert sum(p.numel() for p in model.parameters()) == before + extra * n_ln
    assert torch.equal(model.blocks[1].ln_2.weight, torch.full((16,), 1.5))  # weights carried over
    assert (model.blocks[0].ln_1.bias is None) == (not bias)
    idx = torch.randint(0, 256, (2, 8))
    logits = model(idx)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert model.blocks[0].ln_1.alpha.grad is not None
    assert model.blocks[0].ln_1.alpha.grad.abs() > 0


def test_convert_rejects_unknown_kind_and_keeps_modes() -> None:
    with pytest.raises(ValueError, match="kind"):
        convert_layernorm(nn.LayerNorm(3), "rms")
    seq = nn.Sequential(nn.LayerNorm(3)).eval()
    convert_layernorm(seq, "dyt")
    assert not seq[0].training


def test_demo_model_norm_dyt_derf() -> None:
    for norm, cls in (("dyt", DyT), ("derf", Derf)):
        model = GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8, norm=norm))  # type: ignore[arg-type]
        assert sum(isinstance(m, cls) for m in model.modules()) == 5
        assert torch.isfinite(model(torch.randint(0, 256, (1, 8)))).all()


def test_is_tanh_like_recognises_third_party_classes() -> None:
    class DynamicTanh(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(1))

    class Tanh2(nn.Module):
        pass

    assert is_tanh_like(DynamicTanh())
    assert not is_tanh_like(Tanh2())
    assert not is_tanh_like(nn.Tanh())


def test_demo_model_bidirectional_attention_sees_later_tokens() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (1, 6))
    later = idx.clone()
    later[0, -1] = (later[0, -1] + 1) % 256
    for causal in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=6, norm="dyt", causal=causal))
        with torch.no_grad():
            changed = not torch.allclose(model(idx)[0, 0], model(later)[0, 0])
        assert changed == (not causal)
