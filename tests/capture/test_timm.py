"""timm ViT attention adapter (fused SDPA and non-fused softmax paths, with and without qk_norm).

References: the attention probabilities the module itself materialises on its non-fused path (the input of
its ``attn_drop`` Dropout, read by a test-owned hook), SVD of the ``qkv`` rows, and a deep copy whose query
map was scaled by 1/tau by hand. timm is optional: these tests skip where it is not installed (it needs
torchvision, whose PyPI build does not load beside the CPU torch wheel of the main venv; ``make test-timm``
uses a second venv).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from thetascope.capture import AttentionProbe, registered_adapters
from thetascope.capture.timm_vit import TimmViTAttentionAdapter
from thetascope.functional.theta import balanced_mass_factor


def test_adapter_registered_without_importing_timm() -> None:
    assert TimmViTAttentionAdapter in registered_adapters()
    assert not TimmViTAttentionAdapter.matches(nn.MultiheadAttention(8, 2))

    class Attention(nn.Module):  # same class name, not timm's
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj, self.num_heads = nn.Linear(8, 24), nn.Linear(8, 8), 2

    assert not TimmViTAttentionAdapter.matches(Attention())


@pytest.fixture(scope="module")
def timm() -> Any:
    return pytest.importorskip("timm")


def _vit(timm: Any, fused: bool, qk_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=5,
        qkv_bias=True,
        qk_norm=qk_norm,
    )
    with torch.no_grad():  # sharper attention than the default init, and non-trivial norm affines
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(8.0)
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                if isinstance(norm, nn.LayerNorm):
                    norm.weight.normal_(1.0, 0.5)
                    norm.bias.normal_(0.0, 0.5)
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    return vit.eval()


def _images() -> Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _materialised(vit: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The attention probabilities each block computes, from a non-fused copy (attn_drop's input)."""
    ref = copy.deepcopy(vit)
    seen: dict[str, Tensor] = {}
    handles = []
    for i, blk in enumerate(ref.blocks):
        blk.attn.fused_attn = False

        def hook(mod: nn.Module, args: tuple[Tensor, ...], i: int = i) -> None:
            seen[f"blocks.{i}.attn"] = args[0].detach()

        handles.append(blk.attn.attn_drop.register_forward_pre_hook(hook))
    with torch.no_grad():
        ref(x)
    for h in handles:
        h.remove()
    return seen


CONFIGS = [(True, False), (False, False), (True, True), (False, True)]


@pytest.mark.parametrize(("fused", "qk_norm"), CONFIGS)
def test_theta_matches_materialised_attention(timm: Any, fused: bool, qk_norm: bool) -> None:
    vit = _vit(timm, fused, qk_norm)
    x = _images()
    probe = AttentionProbe(vit, rows_per_head=6)
    assert [r.name for r in probe.layers] == ["blocks.0.attn", "blocks.1.attn"]
    assert {r.kind for r in probe.layers} == {"timm_vit"}
    with torch.no_grad():
        plain = vit(x)
        with probe.capture():
            out = vit(x)
    assert torch.equal(out, plain)  # tau == 1: bitwise the unhooked model
    want = _materialised(vit, x)
    for rec in probe.layers:
        assert rec.norm_placement == "pre"
        assert rec.block_name == rec.name.rsplit(".", 1)[0]
        w, pos = want[rec.name], rec.query_positions
        ref = balanced_mass_factor(
            w.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, w.shape[-1])), validate=False
        )
        assert rec.theta.upper.shape == (2, 4, 6)
        torch.testing.assert_close(rec.theta.lower, ref.lower, atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.theta.upper, ref.upper, atol=1e-5, rtol=0)
    if not qk_norm:  # the sharpened weights give rows well below theta = 1: the check is not vacuous
        assert float(torch.stack([r.theta.upper.min() for r in probe.layers]).min()) < 0.99


def _scaled_copy(vit: nn.Module, tau: float, qk_norm: bool) -> nn.Module:
    """Independent temperature: divide the query map by tau (q_norm's affine with qk_norm, else W_Q, b_q)."""
    ref = copy.deepcopy(vit)
    with torch.no_grad():
        for blk in ref.blocks:
            attn = blk.attn
            if qk_norm:
                attn.q_norm.weight.div_(tau)
                attn.q_norm.bias.div_(tau)
            else:
                d = attn.attn_dim
                attn.qkv.weight[:d].div_(tau)
                attn.qkv.bias[:d].div_(tau)
    return ref


@pytest.mark.parametrize(("fused", "qk_norm"), CONFIGS)
def test_temperature_matches_scaled_query(timm: Any, fused: bool, qk_norm: bool) -> None:
    tau = 2.5
    vit = _vit(timm, fused, qk_norm).train()
    for m in vit.modules():  # deterministic training mode
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ref = _scaled_copy(vit, tau, qk_norm)
    x = _images()
    probe = AttentionProbe(vit, rows_per_head=6)
    probe.set_temperature(tau)
    got, want = vit(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    g, gr = vit.head.weight.grad, ref.head.weight.grad
    assert g is not None
    assert gr is not None
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5 * float(gr.abs().max()))
    # capture under temperature: theta of the tempered rows
    with torch.no_grad(), probe.capture():
        vit(x)
    mat = _materialised(ref, x)
    for rec in probe.layers:
        w, pos = mat[rec.name], rec.query_positions
        r = balanced_mass_factor(
            w.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, w.shape[-1])), validate=False
        )
        torch.testing.assert_close(rec.theta.upper, r.upper, atol=1e-5, rtol=0)
    probe.set_temperature(1.0)
    assert not probe.is_installed
    with torch.no_grad():
        assert torch.equal(vit(x), copy.deepcopy(vit)(x))


def test_projection_weights_match_qkv_rows(timm: Any) -> None:
    vit = _vit(timm, fused=True, qk_norm=False)
    probe = AttentionProbe(vit)
    for rec, blk in zip(probe.layers, vit.blocks):
        pw = rec.weights()
        d, dh = blk.attn.attn_dim, blk.attn.head_dim
        assert (pw.n_heads, pw.n_kv_heads, pw.head_dim) == (4, 4, dh)
        qkv = blk.attn.qkv.weight.detach()
        per_head = pw.per_head()
        for j, key in enumerate("qkv"):
            used = qkv[j * d : (j + 1) * d]
            assert torch.equal(getattr(pw, f"w_{key}"), used)
            for h in range(4):
                torch.testing.assert_close(
                    torch.linalg.matrix_norm(per_head[key][h], ord=2),
                    torch.linalg.svdvals(used[h * dh : (h + 1) * dh])[0],
                    rtol=1e-6,
                    atol=0,
                )
        w_o = blk.attn.proj.weight.detach()
        assert torch.equal(pw.w_o, w_o)
        torch.testing.assert_close(
            torch.linalg.matrix_norm(pw.w_o, ord=2), torch.linalg.svdvals(w_o)[0], rtol=1e-6, atol=0
        )
