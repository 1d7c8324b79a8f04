"""Layer grouping, fused per-group gradient norms and pathology statistics against plain references."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.sync import SyncSpy
from thetascope.functional.gradients import (
    global_grad_norm,
    grad_norms_by_group,
    gradient_pathology,
    group_parameters_by_layer,
    layer_index_of,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("model.layers.11.self_attn.q_proj.weight", 11),
        ("bert.encoder.layer.7.attention.self.query.weight", 7),
        ("blocks.2.mlp.fc1.weight", 2),
        ("layers.0.weight", 0),
        ("h.5.ln_1.bias", 5),
        ("blocks.2.mlp.layers.0.weight", 2),  # first index after a known container
        ("vision_model.encoder.resblocks.4.attn.in_proj_weight", 4),
        ("encoder.block.1.layer.0.SelfAttention.q.weight", 1),
        ("layers.12", 12),
        ("transformer.wte.weight", None),
        ("lm_head.weight", None),
        ("heads.3.weight", None),  # "heads" is not "h"
        ("layer3.weight", None),
        ("shell.0.weight", None),
        ("embeddings.position.0", None),
    ],
)
def test_layer_index_of(name: str, expected: int | None) -> None:
    assert layer_index_of(name) == expected


def test_group_parameters_by_layer_dedups_tied_and_skips_frozen() -> None:
    layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied
    layers[1].bias.requires_grad_(False)
    model = nn.ModuleDict({"emb": emb, "layers": layers, "head": head})
    ids, groups, other = group_parameters_by_layer(model.named_parameters(remove_duplicate=False))
    assert ids == [0, 1, 2]
    assert [len(g) for g in groups] == [2, 1, 2]
    assert len(other) == 1
    assert other[0] is emb.weight
    ids2, groups2, _ = group_parameters_by_layer(model.named_parameters(), layer_of=lambda n: 0)
    assert ids2 == [0]
    assert len(groups2[0]) == 6


def _ref_norms(groups: list[list[nn.Parameter]], other: list[nn.Parameter]) -> tuple[list[float], float]:
    def cat(params: list[nn.Parameter]) -> torch.Tensor:
        flat = [p.grad.double().flatten() for p in params if p.grad is not None]
        return torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)

    per = [float(cat(g).norm()) for g in groups]
    everything = [p for g in groups for p in g] + other
    return per, float(cat(everything).norm())


def _params_with_grads(seed: int) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    shapes: list[list[tuple[int, ...]]] = [[(8, 4), (4,)], [(3, 3, 2)], [(5,), (2, 7), (1,)], []]
    groups = []
    for gi, group in enumerate(shapes):
        params = []
        for pi, shape in enumerate(group):
            p = nn.Parameter(torch.zeros(shape))
            if not (gi == 2 and pi == 2):  # one parameter without a gradient
                p.grad = torch.randn(shape, generator=g) * (gi + 1)
            params.append(p)
        groups.append(params)
    other = [nn.Parameter(torch.zeros(6))]
    other[0].grad = torch.randn(6, generator=g)
    return groups, other


def test_grad_norms_match_concatenated_reference() -> None:
    groups, other = _params_with_grads(0)
    per, total, bad = grad_norms_by_group(groups, other=other, return_nonfinite=True)
    ref_per, ref_total = _ref_norms(groups, other)
    assert per.dtype == torch.float32
    assert per.shape == (4,)
    assert total.shape == ()
    np.testing.assert_allclose(per.numpy(), ref_per, rtol=1e-6)
    assert float(total) == pytest.approx(ref_total, rel=1e-6)
    assert int(bad) == 0
    per2, total2 = grad_norms_by_group(groups)  # without `other`: global covers the groups only
    np.testing.assert_allclose(per2.numpy(), ref_per, rtol=1e-6)
    assert float(total2) == pytest.approx(float(np.linalg.norm(ref_per)), rel=1e-6)


def test_grad_norms_use_one_foreach_call_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    groups, other = _params_with_grads(1)
    real = torch._foreach_norm
    calls: list[int] = []

    def counting(tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    per, total = grad_norms_by_group(groups, other=other)
    assert calls == [6]  # 7 parameters, one without a gradient
    monkeypatch.delattr(torch, "_foreach_norm")
    per_fb, total_fb = grad_norms_by_group(groups, other=other)
    torch.testing.assert_close(per_fb, per)
    torch.testing.assert_close(total_fb, total)


def test_grad_norms_nonfinite_are_confined_to_their_group() -> None:
    groups, other = _params_with_grads(2)
    g0, g1 = groups[0][0].grad, groups[1][0].grad
    assert g0 is not None
    assert g1 is not None
    g0[1, 1] = float("inf")
    g1[0, 0, 0] = float("nan")
    per, total, bad = grad_norms_by_group(groups, other=other, return_nonfinite=True)
    assert torch.isinf(per[0])
    assert torch.isnan(per[1])
    assert bool(torch.isfinite(per[2:]).all())
    assert not torch.isfinite(total)
    assert int(bad) == 2


def test_grad_norms_fp16_large_gradients_do_not_overflow() -> None:
    p = nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    p.grad = torch.full((4096,), 100.0, dtype=torch.float16)  # norm 6400, its square overflows fp16
    per, total = grad_norms_by_group([[p]])
    assert float(per[0]) == pytest.approx(6400.0, rel=1e-3)
    assert float(total) == pytest.approx(6400.0, rel=1e-3)


def test_grad_norms_without_any_gradient_and_without_sync() -> None:
    p = nn.Parameter(torch.zeros(3))
    per, total = grad_norms_by_group([[p], []])
    assert per.tolist() == [0.0, 0.0]
    assert float(total) == 0.0
    groups, other = _params_with_grads(3)
    with SyncSpy() as spy:
        per, total = grad_norms_by_group(groups, other=other)
        stats = gradient_pathology(per)
    assert spy.calls == []
    assert set(stats) == {
        "early_late_ratio",
        "log_slope",
        "vanishing_layers",
        "min_max_ratio",
        "argmin_layer",
    }


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12])
def test_gradient_pathology_against_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    norms = np.exp(rng.normal(size=n) * 2)
    norms[rng.integers(n)] *= 1e-4  # one starved layer
    stats = gradient_pathology(torch.tensor(norms, dtype=torch.float64), vanishing_fraction=0.01)
    third = max(1, n // 3)
    assert float(stats["early_late_ratio"]) == pytest.approx(norms[:third].mean() / norms[-third:].mean())
    slope = np.polyfit(np.arange(n), np.log(norms), 1)[0] if n > 1 else 0.0
    assert float(stats["log_slope"]) == pytest.approx(slope, abs=1e-9)
    assert int(stats["vanishing_layers"]) == int((norms < 0.01 * norms.max()).sum())
    assert float(stats["min_max_ratio"]) == pytest.approx(norms.min() / norms.max())
    assert int(stats["argmin_layer"]) == int(norms.argmin())


def test_gradient_pathology_edge_cases() -> None:
    stats = gradient_pathology(torch.tensor([1.0, 0.0, 2.0]))
    assert torch.isfinite(stats["log_slope"])  # zero norms are floored, not -inf
    assert int(stats["vanishing_layers"]) == 1
    nan_stats = gradient_pathology(torch.tensor([1.0, float("nan"), 2.0]))
    assert torch.isnan(nan_stats["log_slope"])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        gradient_pathology(torch.ones(2, 2))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        gradient_pathology(torch.ones(0))
    with pytest.raises(ValueError, match=r"vanishing_fraction must be in \(0, 1\)"):
        gradient_pathology(torch.ones(3), vanishing_fraction=1.5)


class _TinyLM(nn.Module):
    def __init__(self, norm_first: bool, n_layers: int = 6, d: int = 32, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.out(self.encoder(self.emb(tokens), mask=mask, is_causal=True))


def _profile(norm_first: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[float]]:
    torch.manual_seed(0)
    model = _TinyLM(norm_first)
    tokens = torch.randint(0, 50, (4, 24))
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    ids, groups, other = group_parameters_by_layer(model.named_parameters())
    assert ids == list(range(6))
    assert len(other) == 3
    per, total = grad_norms_by_group(groups, other=other)
    ref_per, ref_total = _ref_norms(groups, other)
    np.testing.assert_allclose(per.numpy(), ref_per, rtol=1e-5)
    assert float(total) == pytest.approx(ref_total, rel=1e-5)
    return gradient_pathology(per), per, ref_per


def test_real_pre_ln_and_post_ln_models() -> None:
    pre, _pre_norms, _ = _profile(norm_first=True)
    post, _post_norms, _ = _profile(norm_first=False)
    for stats in (pre, post):
        assert all(bool(torch.isfinite(v)) for v in stats.values())
    # post-LN: every path to early layers crosses LayerNorm Jacobians; the profile tilts towards the output
    assert float(post["early_late_ratio"]) < float(pre["early_late_ratio"])
    assert float(post["log_slope"]) > float(pre["log_slope"])


def test_global_grad_norm_matches_numpy_and_skips_missing_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(shape)) for shape in [(7, 5), (3,), (2, 2, 2), (4,)]]
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=gen)
    # params[3] has no gradient: it is left out, not counted as zero or NaN
    expected = np.sqrt(
        sum(float((p.grad.double().numpy() ** 2).sum()) for p in params[:3] if p.grad is not None)
    )
    got = global_grad_norm(params)
    assert got is not None
    assert got.dtype == torch.float32
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert global_grad_norm(params[3:]) is None


def test_global_grad_norm_records_no_graph_of_gradients_that_require_grad() -> None:
    # after backward(create_graph=True) the gradients are part of a graph; the monitor's norm must not be
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    (w**3).sum().backward(create_graph=True)
    assert w.grad is not None
    assert w.grad.requires_grad
    got = global_grad_norm([w])
    assert got is not None
    assert not got.requires_grad
    assert got.grad_fn is None
    assert float(got) == pytest.approx(float(np.linalg.norm(3 * np.array([1.0, 4.0, 9.0]))), rel=1e-6)
