"""nanoGPT-style models (generic adapter): theta against torch's own attention weights, weights, training."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from tests.capture.conftest import NanoGPT, sdpa_probs
from thetascope.capture import AttentionProbe
from thetascope.functional.theta import balanced_mass_factor


def _qk(model: NanoGPT, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """q, k of every layer, recomputed from the attention inputs seen by hooks on the model."""
    u: list[Tensor] = []
    hs = [b.attn.register_forward_pre_hook(lambda m, a: u.append(a[0])) for b in model.transformer.h]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    out = []
    for ui, b in zip(u, model.transformer.h, strict=True):
        q, k, _ = b.attn.c_attn(ui).split(b.attn.n_embd, dim=2)
        bsz, t, _c = ui.shape
        out.append(tuple(z.view(bsz, t, b.attn.n_head, -1).transpose(1, 2) for z in (q, k)))
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("flash", [True, False])
def test_theta_matches_torch_attention_weights(flash: bool, nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt(flash=flash, n_layer=3).eval()
    with torch.no_grad():
        for b in model.transformer.h:
            b.attn.c_attn.weight.mul_(6)
    x = torch.randint(0, 50, (2, 14))
    probe = AttentionProbe(model, rows_per_head=5, seed=1)
    assert [r.kind for r in probe.layers] == ["nanogpt"] * 3
    with torch.no_grad(), probe.capture():
        model(x)
    for rec, (q, k) in zip(probe.layers, _qk(model, x), strict=True):
        probs = sdpa_probs(q, k, is_causal=True)
        rows = probs.gather(2, rec.query_positions.unsqueeze(-1).expand(-1, -1, -1, 14))
        want = balanced_mass_factor(rows.double(), validate=False)
        torch.testing.assert_close(rec.theta.upper.double(), want.upper, atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.theta.lower.double(), want.lower, atol=1e-5, rtol=0)
        assert int(rec.n_masked_rows) == 0
        assert int(rec.n_nonfinite_rows) == 0


def test_weights_and_per_head(nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt()
    probe = AttentionProbe(model)
    x = torch.randn(2, 5, 32)
    for rec, b in zip(probe.layers, model.transformer.h, strict=True):
        w = rec.weights()
        q, k, v = b.attn.c_attn(x).split(32, dim=2)
        bq, bk, bv = b.attn.c_attn.bias.split(32)
        torch.testing.assert_close(x @ w.w_q.T + bq, q)
        torch.testing.assert_close(x @ w.w_k.T + bk, k)
        torch.testing.assert_close(x @ w.w_v.T + bv, v)
        assert w.w_o is not None
        assert w.w_o.data_ptr() == b.attn.c_proj.weight.data_ptr()
        ph = w.per_head()
        for h in range(4):
            sl = b.attn.c_attn.weight[h * 8 : (h + 1) * 8].detach()
            torch.testing.assert_close(
                torch.linalg.matrix_norm(ph["q"][h], ord=2), torch.linalg.svdvals(sl)[0]
            )
        assert rec.path_length_m == 4
        assert not w.shared_qk


def test_measuring_inside_a_training_loop(nanogpt: Callable[..., NanoGPT]) -> None:
    """Capture every other step of a real training loop (grad enabled, dropout on), temperature on
    throughout."""
    model = nanogpt(dropout=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = AttentionProbe(model, rows_per_head=4)
    x = torch.randint(0, 50, (4, 12))
    losses = []
    for step in range(6):
        probe.set_temperature(2.0 - step * 0.2)
        if step % 2 == 0:
            with probe.capture():
                logits = model(x[:, :-1])
            assert all(r.n_captures == step // 2 + 1 for r in probe.layers)
            assert all(bool(r.theta.upper.isfinite().all()) for r in probe.layers)
        else:
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    probe.set_temperature(1.0)
    assert not probe.is_installed
