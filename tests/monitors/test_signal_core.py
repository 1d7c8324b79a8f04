"""SignalPropagationCore on real demo models: values vs dense Jacobians, no side effects, failures, ranks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from tests.helpers.threads import single_thread  # noqa: F401  (autouse: one intra-op thread)
from thetascope.demo.model import GPT, GPTConfig
from thetascope.functional.apjn import averaged_partial_jacobian_norm_exact
from thetascope.monitors._base import MonitorCore
from thetascope.monitors.signal import SignalPropagationCore, find_blocks
from thetascope.nn import DyT


def _model(norm: str, causal: bool = True, n_layer: int = 4, d: int = 8, seq: int = 4) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_embd=d, n_head=2, block_size=seq, norm=norm, causal=causal))  # type: ignore[arg-type]
    for m in model.modules():  # O(1) init, so the profile is far from flat
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
    return model.double()


@pytest.mark.parametrize(("norm", "causal"), [("pre", True), ("dyt", False), ("derf", True), ("post", False)])
def test_profile_matches_dense_jacobian_of_the_block_stack(norm: str, causal: bool) -> None:
    model = _model(norm, causal)
    idx = torch.randint(0, 256, (2, 4))
    core = SignalPropagationCore(model, n_probes=32)
    out = core.reduce(core.measure(lambda: model(idx)))
    assert isinstance(core, MonitorCore)
    with torch.no_grad():
        h0 = model.transformer["wte"](idx) + model.transformer["wpe"](torch.arange(4))
    blocks = model.blocks
    for layer in range(4):
        exact = float(averaged_partial_jacobian_norm_exact(nn.Sequential(*blocks[: layer + 1]), h0))
        got = out[f"stability/apjn/layer_{layer:02d}"]
        se = out[f"stability/apjn_stderr/layer_{layer:02d}"]
        assert 0 < se < 0.3 * exact, (layer, se, exact)
        assert abs(got - exact) <= 4 * se, (layer, got, exact, se)
    assert out["stability/signal/verdict"] == out["stability/card/signal_verdict"] in (-1.0, 0.0, 1.0)
    assert core.card_line() is not None
    assert core.card_line().startswith("signal propagation at init:")


def test_measurement_changes_nothing_bitwise() -> None:
    model = _model("dyt").float()
    model.blocks[1].train(False)  # a mixed mode that must come back as it was
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    core = SignalPropagationCore(model)
    idx = torch.randint(0, 256, (2, 4))
    rng = torch.get_rng_state()
    core.reduce(core.measure(lambda: model(idx)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.grad is not None
        assert torch.equal(p.grad, grads[n]), n


def test_saturation_and_alpha_match_a_manual_count() -> None:
    model = _model("dyt", n_layer=2).float()
    with torch.no_grad():
        model.blocks[1].ln_2.alpha.fill_(3.0)
    seen: list[torch.Tensor] = []
    model.blocks[1].ln_2.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    core = SignalPropagationCore(model, saturation_threshold=1.5)
    idx = torch.randint(0, 256, (3, 4))
    out = core.reduce(core.measure(lambda: model(idx)))
    frac = float((3.0 * seen[0]).abs().gt(1.5).float().mean())
    assert 0 < frac < 1
    assert out["stability/norm_saturation/ln_2/layer_01"] == pytest.approx(frac)
    assert out["stability/norm_alpha/ln_2/layer_01"] == 3.0
    assert out["stability/norm_alpha/ln_1/layer_00"] == 0.5
    assert "stability/norm_alpha/transformer.ln_f" in out
    assert 0 <= out["stability/signal/norm_saturation"] <= 1


def test_reduce_over_two_ranks_averages_and_combines_stderr() -> None:
    model = _model("pre").float()
    core = SignalPropagationCore(model, layers=[0, 3])
    a = core.measure(lambda: model(torch.randint(0, 256, (2, 4))))
    b = core.measure(lambda: model(torch.randint(0, 256, (2, 4))))
    from thetascope.monitors._collective import PackedValues

    def two_ranks(vec: torch.Tensor) -> torch.Tensor:  # rank 1 holds b's values in the same layout
        packed = PackedValues()
        for k, _op in (("apjn", 0), ("apjn_se2", 0), ("alpha", 0), ("saturated", 0), ("elements", 0)):
            packed.add(k, b[k])
        packed.add("world", torch.ones(()))
        packed.add("failed", b["failed"])
        return torch.stack([vec, packed.vector()])

    out = core.reduce(a, two_ranks)
    assert sorted(k for k in out if "/layer_" in k) == [
        "stability/apjn/layer_00",
        "stability/apjn/layer_03",
        "stability/apjn_stderr/layer_00",
        "stability/apjn_stderr/layer_03",
    ]
    mean = float((a["apjn"][3] + b["apjn"][3]) / 2)
    se = math.sqrt(float(a["apjn_se2"][3] + b["apjn_se2"][3])) / 2
    assert out["stability/apjn/layer_03"] == pytest.approx(mean, rel=1e-6)
    assert out["stability/apjn_stderr/layer_03"] == pytest.approx(se, rel=1e-5)


def test_failure_warns_once_disables_and_strict_raises() -> None:
    model = _model("pre").float()
    idx = torch.randint(0, 256, (1, 4))
    core = SignalPropagationCore(model)
    with pytest.warns(RuntimeWarning, match="signal"):
        vals = core.measure(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert core.reduce(vals) == {}
    assert not core.guard.active("signal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core.measure(lambda: model(idx)) == {}
    strict = SignalPropagationCore(model, strict=True)
    with pytest.raises(RuntimeError, match="no floating-point hidden state"):
        strict.measure(lambda: None)


def test_construction_errors_and_block_finding() -> None:
    with pytest.raises(ValueError, match="blocks"):
        SignalPropagationCore(nn.Sequential(nn.Linear(2, 2)))
    model = _model("pre")
    for bad in (dict(n_probes=1), dict(saturation_threshold=0), dict(layers=[9]), dict(prefix=1)):
        with pytest.raises(ValueError):
            SignalPropagationCore(model, **bad)  # type: ignore[arg-type]
    assert find_blocks(model) == model.blocks
    assert SignalPropagationCore(nn.Sequential(DyT(2)), blocks=[nn.Linear(2, 2)]).norm_names == ["0"]


def test_state_round_trip_continues_probe_seeds() -> None:
    model = _model("pre", n_layer=4).float()
    idx = torch.randint(0, 256, (2, 4))
    core = SignalPropagationCore(model)
    first = core.reduce(core.measure(lambda: model(idx)))
    state = core.state_dict()
    again = SignalPropagationCore(model)
    again.load_state_dict(state)
    assert again.init_fit == core.init_fit
    assert again.measurements == 1
    nxt = core.reduce(core.measure(lambda: model(idx)))
    assert again.reduce(again.measure(lambda: model(idx))) == pytest.approx(nxt)
    assert nxt != first  # the second measurement uses fresh probes
