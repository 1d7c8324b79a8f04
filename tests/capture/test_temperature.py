"""Temperature hook: logits / tau equals scaling W_Q (and its bias) by 1/tau; tau == 1 is bitwise a no-op."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests.capture.conftest import NanoGPT
from tests.capture.test_hf import _build
from thetascope.capture import AttentionProbe

transformers = pytest.importorskip("transformers")


def _hf(family: str, impl: str) -> nn.Module:
    return _build(family, impl)  # tiny configs with enlarged weights (peaked attention)


def _scale_queries(model: nn.Module, tau: float) -> None:
    """The independent route: divide W_Q and b_Q of every layer by tau."""
    with torch.no_grad():
        for m in model.modules():
            name = type(m).__name__
            if name == "GPT2Attention":
                m.c_attn.weight[:, :32] /= tau
                m.c_attn.bias[:32] /= tau
            elif name == "LlamaAttention":
                m.q_proj.weight /= tau
            elif name == "BertSelfAttention":
                m.query.weight /= tau
                m.query.bias /= tau
            elif name == "CausalSelfAttention":
                m.c_attn.weight[:32] /= tau
                m.c_attn.bias[:32] /= tau


def _out(model: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    if isinstance(model, NanoGPT):
        return model(x)
    return model(x, attention_mask=mask).last_hidden_state  # type: ignore[no-any-return]


_FFN = ("mlp", "intermediate", "output.dense")
MODELS = [
    ("gpt2", "eager"),
    ("gpt2", "sdpa"),
    ("llama", "eager"),
    ("llama", "sdpa"),
    ("bert", "eager"),
    ("bert", "sdpa"),
    ("nanogpt", "flash"),
    ("nanogpt", "manual"),
]


@pytest.mark.parametrize(("family", "impl"), MODELS)
def test_temperature_equals_scaled_queries(family: str, impl: str, nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt(flash=impl == "flash") if family == "nanogpt" else _hf(family, impl)
    model.train()  # temperature acts on training forwards; dropout is 0 in these configs except HF defaults
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randint(1, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -2:] = 0
    y_plain = _out(model, x, mask)
    pristine = copy.deepcopy(model)  # deep-copying later would copy the probe's hooks too
    probe = AttentionProbe(model, rows_per_head=None)
    for tau in (3.0, 0.7):
        ref = copy.deepcopy(pristine)
        _scale_queries(ref, tau)
        probe.set_temperature(tau)
        y = _out(model, x, mask)
        y_ref = _out(ref, x, mask)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
        assert (y - y_plain).abs().max() > 1e-4
        # gradients flow through the tempered path like through the scaled model (W_O is untouched)
        y.square().mean().backward()
        y_ref.square().mean().backward()
        g = [p.grad for n, p in model.named_parameters() if any(s in n for s in _FFN)]
        g_ref = [p.grad for n, p in ref.named_parameters() if any(s in n for s in _FFN)]
        assert g
        assert all(t is not None for t in g)
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        model.zero_grad()
        # what the probe measures under temperature is the tempered attention
        with torch.no_grad(), probe.capture():
            _out(model, x, mask)
        ref_probe = AttentionProbe(ref, rows_per_head=None)
        with torch.no_grad(), ref_probe.capture():
            _out(ref, x, mask)
        for a_rec, r_rec in zip(probe.layers, ref_probe.layers, strict=True):
            torch.testing.assert_close(
                a_rec.theta.upper, r_rec.theta.upper, atol=1e-4, rtol=0, equal_nan=True
            )
    probe.set_temperature(1.0)
    assert torch.equal(_out(model, x, mask), y_plain)


def test_tau_is_one_device_tensor_updated_in_place(nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt()
    probe = AttentionProbe(model)
    probe.set_temperature(2.0)
    t = probe._inv_tau_on(torch.device("cpu"))
    probe.set_temperature(4.0)
    assert probe._inv_tau_on(torch.device("cpu")) is t
    assert float(t) == 0.25
    assert probe.temperature == 4.0
    probe.set_temperature(1.0)
    assert float(t) == 1.0
    probe.set_temperature(2.0)
    probe.remove()
    assert not probe.is_installed
    assert probe.temperature == 1.0
