"""torch.compile: the temperature hook runs inside the compiled step without recompiling when tau changes."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.capture.conftest import NanoGPT, mha_scaled_copy
from thetascope.capture import AttentionProbe


class CountingBackend:
    """A dynamo backend that counts compilations and runs the captured graph eagerly."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.n += 1
        return gm.forward  # type: ignore[no-any-return]


@pytest.mark.parametrize("flash", [True, False])
def test_compiled_training_with_changing_tau(flash: bool, nanogpt: Callable[..., NanoGPT]) -> None:
    torch._dynamo.reset()
    model = nanogpt(flash=flash).train()
    ref = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = AttentionProbe(compiled, rows_per_head=4)
    assert probe.model is model
    ref_probe = AttentionProbe(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    x = torch.randint(0, 50, (2, 10))
    counts = []
    for step, tau in enumerate([4.0, 3.0, 2.5, 2.0, 1.5, 1.25]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.set_temperature(tau)
        ref_probe.set_temperature(tau)
        for m, o in ((compiled, opt), (ref, ref_opt)):
            loss = m(x).logsumexp(-1).mean()
            o.zero_grad()
            loss.backward()
            o.step()
        counts.append(backend.n)
        torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight, atol=1e-5, rtol=1e-5)
        if step % 2 == 1:  # a measurement step: a separate eager forward on the uncompiled module
            with torch.no_grad(), probe.capture():
                probe.model(x)
            assert probe.layers[0].theta is not None
            assert probe.layers[0].n_captures == (step + 1) // 2
    assert counts[0] >= 1
    assert counts[-1] == counts[0], f"recompiled while tau changed: {counts}"


def test_capture_inside_compiled_graph_warns_with_remedy(nanogpt: Callable[..., NanoGPT]) -> None:
    torch._dynamo.reset()
    model = nanogpt().eval()
    compiled = torch.compile(model, backend="eager")
    probe = AttentionProbe(compiled, rows_per_head=4)
    x = torch.randint(0, 50, (2, 8))
    with pytest.warns(UserWarning, match="_orig_mod"), torch.no_grad(), probe.capture():
        compiled(x)
    assert probe.layers[0].theta is None  # not measured inside the graph
    with torch.no_grad(), probe.capture():
        probe.model(x)
    assert probe.layers[0].theta is not None


def test_compiled_torch_mha_training_with_changing_tau() -> None:
    # nn.TransformerEncoder: the temperature reaches the compiled forward through the shadow of the query
    # projection (torch_mha's enter_temperature), compiled once, and trains as the eager twin does
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
    ref = copy.deepcopy(model)
    first = mha_scaled_copy(model, 4.0)  # the first step's output, independently of the probe
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = AttentionProbe(compiled, rows_per_head=4)
    ref_probe = AttentionProbe(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    x = torch.randn(2, 6, 32)
    counts = []
    try:
        for step, tau in enumerate([4.0, 3.0, 2.5, 2.0, 1.5]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe.set_temperature(tau)
            ref_probe.set_temperature(tau)
            outs = []
            for m, o in ((compiled, opt), (ref, ref_opt)):
                out = m(x)
                outs.append(out.detach())
                o.zero_grad()
                out.square().mean().backward()
                o.step()
            if step == 0:
                torch.testing.assert_close(outs[0], first(x).detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
            counts.append(backend.n)
    finally:
        probe.set_temperature(1.0)
        ref_probe.set_temperature(1.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[name], atol=1e-5, rtol=1e-5)
    assert counts[0] >= 1
    assert counts[-1] == counts[0], f"recompiled while tau changed: {counts}"
