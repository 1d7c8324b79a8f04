"""AttentionMonitor from a plain loop (no Lightning): keys, references, failures, state, stacks."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

from tests.callbacks._models import demo_reference, exhaustive_theta, make_model
from thetascope.keys import ATTENTION_LAYER_FIELDS, layer_key, parse_layer_key
from thetascope.monitors import _base
from thetascope.monitors.attention import AttentionMonitor


def _model(n_layer: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_model("demo-pre", n_layer=n_layer)
    with torch.no_grad():  # sharper attention than at init, so theta is spread out
        for block in model.transformer["h"]:
            block.attn.c_attn.weight.mul_(15.0)
    return model


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def _measure(mon: AttentionMonitor, model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    with mon.capture():
        model(x)
    return mon.reduce(mon.measure())


def test_plain_loop_values_match_materialised_attention() -> None:
    model, x = _model(), _batch()
    mon = AttentionMonitor(model, rows_per_head=64, strict=True)
    assert isinstance(mon, _base.MonitorCore)
    ref = demo_reference(model, x)
    got = _measure(mon, model, x)
    for i, layer in enumerate(ref):
        theta = exhaustive_theta(layer["probs"]).reshape(-1)

        def key(field: str, i: int = i) -> str:
            return layer_key("stability/", field, i)

        assert got[key("theta_max_lower")] - 1e-6 <= float(theta.max()) <= got[key("theta_max")] + 1e-6
        assert got[key("theta_p10")] == pytest.approx(float(theta.quantile(0.1)), abs=2e-3 + 1e-6)
        assert got[key("attn_input_max_norm")] == pytest.approx(
            float(layer["attn_input"].double().norm(dim=-1).max()), rel=1e-5
        )
        assert got[key("sensitivity")] == pytest.approx(
            got[key("theta_max")] * got[key("attn_input_max_norm")] ** 2 * got[key("proj_norm")], rel=1e-5
        )
    fields = {parse_layer_key(k, "stability/") for k in got if "/layer_" in k}
    assert {f for f, _, _ in fields} <= set(ATTENTION_LAYER_FIELDS)
    assert mon.headline(got) == {
        "stability/theta_max": max(got[layer_key("stability/", "theta_max", i)] for i in range(2)),
        "stability/sensitivity_max": max(got[layer_key("stability/", "sensitivity", i)] for i in range(2)),
    }
    assert all(math.isfinite(v) for v in got.values())
    cols = mon.heatmap_columns(got)
    assert cols["theta_max"] == [got[layer_key("stability/", "theta_max", i)] for i in range(2)]
    assert mon.architecture_card()["depth"] == 2


def test_auto_layers_keep_headline_and_heatmap_over_every_layer() -> None:
    model, x = _model(n_layer=6), _batch()
    mon = AttentionMonitor(model, rows_per_head=4, layers=[0, 5])
    got = _measure(mon, model, x)
    assert {parse_layer_key(k)[2] for k in got if "/layer_" in k} == {0, 5}  # type: ignore[index]
    cols = mon.heatmap_columns(got)
    assert len(cols["theta_max"]) == 6
    assert all(math.isfinite(v) for v in cols["theta_max"])
    assert got["stability/theta_max"] == max(cols["theta_max"])


def test_stacked_layers_and_max_logit_get_their_keys() -> None:
    model, x = _model(), _batch()
    mon = AttentionMonitor(model, rows_per_head=4, strict=True)
    with mon.capture():
        model(x)
    rec = mon.probe.layers[1]
    rec.stack = "decoder"  # as the capture of an encoder-decoder model fills it
    logits = torch.tensor([[[1.0, 7.5, -math.inf]]])
    rec.max_logit = logits
    got = mon.reduce(mon.measure())
    assert "stability/theta_max/decoder/layer_01" in got
    assert got["stability/max_logit/decoder/layer_01"] == 7.5
    # layer 0's max_logit is the capture's own: the largest of its measured rows
    rec0 = mon.probe.layers[0]
    assert rec0.max_logit is not None
    assert got["stability/max_logit/layer_00"] == pytest.approx(
        float(rec0.max_logit.nan_to_num(-math.inf).max())
    )


def test_failures_warn_once_disable_and_never_raise() -> None:
    model, x = _model(), _batch()
    mon = AttentionMonitor(model, rows_per_head=4)

    def boom(*args: Any) -> Any:
        raise RuntimeError("synthetic failure")

    mon._spectral = boom  # type: ignore[method-assign]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got = _measure(mon, model, x)
    assert len([w for w in caught if "synthetic failure" in str(w.message)]) == 1
    assert mon.guard.disabled == {"spectral"}
    assert "stability/theta_max/layer_00" in got
    assert "stability/proj_norm/layer_00" not in got

    strict = AttentionMonitor(model, rows_per_head=4, strict=True)
    strict._spectral = boom  # type: ignore[method-assign]
    with strict.capture():
        model(x)
    with pytest.raises(RuntimeError, match="synthetic failure"):
        strict.measure()


def test_state_round_trip_resumes_row_sampling() -> None:
    model, x = _model(), _batch()
    a = AttentionMonitor(model, rows_per_head=3)
    _measure(a, model, x)
    state = a.state_dict()
    assert state["probe_captures"] == 1
    assert state["spectral"]["vectors"]
    other = _model()
    b = AttentionMonitor(other, rows_per_head=3)
    b.load_state_dict(state)
    assert _measure(b, other, x) == _measure(a, model, x)  # same rows, same vectors: same values
    with pytest.raises(ValueError, match="unreadable"):
        b.load_state_dict({"probe_captures": "two"})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"rows_per_head": 0}, "rows_per_head"), ({"exact_top": 0}, "exact_top"), ({"layers": [7]}, "layers")],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AttentionMonitor(_model(), **kwargs)


class _WrappedLinear(torch.nn.Module):
    """A projection behind a wrapper the probe does not recognise as a Linear."""

    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_layer_without_found_projections_keeps_theta_and_drops_only_g() -> None:
    from tests.capture import hf_zoo

    arch = hf_zoo.ARCHS["llama"]
    model = hf_zoo.build(arch, "eager")
    attn0 = model.layers[0].self_attn
    attn0.q_proj = _WrappedLinear(attn0.q_proj)
    inputs, _ = hf_zoo.inputs(arch, padded=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = AttentionMonitor(model, rows_per_head=8)
    assert [r.has_weights for r in mon.probe.layers] == [False, True]
    assert any("layer" in str(w.message).lower() for w in caught)  # said once, at discovery
    with mon.capture():
        model(**inputs)
    got = mon.reduce(mon.measure())
    for field in ("theta_max", "entropy", "attn_input_max_norm"):
        assert math.isfinite(got[layer_key("stability/", field, 0)])
        assert math.isfinite(got[layer_key("stability/", field, 1)])
    for field in ("proj_norm", "sensitivity", "lipschitz_bound"):
        assert layer_key("stability/", field, 0) not in got
        assert math.isfinite(got[layer_key("stability/", field, 1)])
    assert mon.guard.active("spectral")


def test_layers_measured_together_give_the_per_layer_values(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from benchmarks._ops import OpCounter

    model, x = _model(n_layer=4), _batch()
    mon = AttentionMonitor(model, rows_per_head=8, strict=True)
    with mon.capture():
        model(x)
    mon.measure()  # the power iteration's cold start: the calls below are warm ones
    warm = copy.deepcopy(mon.estimator.state_dict())
    with OpCounter() as ops:
        values = mon.measure()
    assert len(mon._stats_together(mon.probe.layers)) == 4  # one group: every layer has the same rows
    got = mon.reduce(values)
    mon.estimator.load_state_dict(warm)  # the same power-iteration start: the same norms
    monkeypatch.setattr(AttentionMonitor, "_stats_together", lambda self, recs, norms=None: {})
    with OpCounter() as per_layer_ops:
        per_layer = mon.reduce(mon.measure())
    assert len(got) > 40
    assert any("lipschitz_bound" in k for k in got)
    assert got.keys() == per_layer.keys()
    for key, value in got.items():
        assert value == per_layer[key], key
    assert ops.n < per_layer_ops.n - 150  # about 100 operations per layer less than one at a time


def test_a_failing_group_falls_back_to_the_layers_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _model(n_layer=3), _batch()
    mon = AttentionMonitor(model, rows_per_head=8, strict=True)
    expected = _measure(mon, model, x)

    real = AttentionMonitor._group_stats

    def broken(self: AttentionMonitor, recs: list[Any]) -> dict[str, torch.Tensor]:
        if len(recs) > 1:  # the stacked computation of several layers; one layer is the per-layer path
            raise RuntimeError("stacking failed")
        return real(self, recs)

    monkeypatch.setattr(AttentionMonitor, "_group_stats", broken)
    mon2 = AttentionMonitor(_model(n_layer=3), rows_per_head=8, strict=True)
    assert _measure(mon2, mon2.model, x).keys() == expected.keys()


def test_sampled_heads_get_the_same_bounds_together_and_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from thetascope.capture.probe import AttentionProbe

    model, x = _model(n_layer=3), _batch()
    mon = AttentionMonitor(model, rows_per_head=8, strict=True)
    mon.probe = AttentionProbe(model, rows_per_head=8, heads=[1, 3])  # two of the four heads
    with mon.capture():
        model(x)
    mon.measure()
    warm = copy.deepcopy(mon.estimator.state_dict())
    together = mon.reduce(mon.measure())
    mon.estimator.load_state_dict(warm)
    real = AttentionMonitor._stats_together
    monkeypatch.setattr(AttentionMonitor, "_stats_together", lambda self, recs, norms=None: {})
    apart = mon.reduce(mon.measure())
    bounds = [k for k in together if "lipschitz_bound" in k]
    assert len(bounds) == 3
    assert together == apart
    with torch.no_grad():
        grouped = real(mon, mon.probe.layers, mon._spectral())
    assert all("lipschitz_bound" in v for v in grouped.values())  # the group path ran
