"""AttentionProbe core: SDPA semantics, sampling, discovery, hook hygiene, RNG isolation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.capture.conftest import NanoGPT, sdpa_probs
from thetascope.capture import AttentionAdapter, AttentionProbe, ProjectionWeights, register_adapter
from thetascope.capture.adapters import registered_adapters, unregister_adapter
from thetascope.functional.theta import balanced_mass_factor


class KernelAttention(nn.Module):
    """Hand-written attention calling SDPA with configurable arguments (k/v may come from a memory)."""

    def __init__(self, d: int = 16, n_head: int = 4, n_kv: int | None = None, **sdpa_kw: Any) -> None:
        super().__init__()
        self.n_head = n_head
        n_kv = n_kv or n_head
        hd = d // n_head
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.k_proj, self.v_proj = nn.Linear(d, n_kv * hd), nn.Linear(d, n_kv * hd)
        self.sdpa_kw = sdpa_kw
        self.last: dict[str, Tensor] = {}

    def forward(self, x: Tensor, mem: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        mem = x if mem is None else mem
        b, lq, d = x.shape
        q = self.q_proj(x).view(b, lq, self.n_head, -1).transpose(1, 2)
        k = self.k_proj(mem).view(b, mem.shape[1], -1, q.shape[-1]).transpose(1, 2)
        v = self.v_proj(mem).view(b, mem.shape[1], -1, q.shape[-1]).transpose(1, 2)
        self.last = {"q": q.detach(), "k": k.detach()}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **self.sdpa_kw)
        return self.o_proj(y.transpose(1, 2).reshape(b, lq, d))


def _check_against_torch(module: KernelAttention, x: Tensor, mem: Tensor | None, mask: Tensor | None) -> Any:
    probe = AttentionProbe(module, rows_per_head=None)
    with torch.no_grad(), probe.capture():
        module(x, mem, mask)
    rec = probe.layers[0]
    kw = {k: v for k, v in module.sdpa_kw.items() if k != "dropout_p"}
    probs = sdpa_probs(module.last["q"], module.last["k"], attn_mask=mask, **kw)
    want = balanced_mass_factor(probs.double(), validate=False)
    assert rec.theta is not None
    finite = torch.isfinite(rec.theta.upper)
    torch.testing.assert_close(rec.theta.upper[finite].double(), want.upper[finite], atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.theta.lower[finite].double(), want.lower[finite], atol=1e-5, rtol=0)
    return rec, probs


@pytest.mark.parametrize(
    ("lq", "lk", "kw"),
    [
        (7, 7, {"is_causal": True}),
        (4, 9, {"is_causal": True}),  # torch aligns the causal mask top-left when Lq != Lk
        (9, 4, {"is_causal": True}),
        (6, 6, {"scale": 0.9}),
        (5, 8, {}),
    ],
)
def test_sdpa_semantics_match_torch(lq: int, lk: int, kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    m = KernelAttention(**kw)
    with torch.no_grad():
        m.q_proj.weight.mul_(6)
    x, mem = torch.randn(2, lq, 16), torch.randn(2, lk, 16)
    rec, _probs = _check_against_torch(m, x, mem, None)
    assert int(rec.n_masked_rows) == 0
    assert rec.theta.upper.isfinite().all()


@pytest.mark.parametrize("kind", ["bool", "additive", "bool_2d"])
def test_sdpa_masks_and_fully_masked_rows(kind: str) -> None:
    torch.manual_seed(1)
    m = KernelAttention()
    x = torch.randn(2, 6, 16)
    keep = torch.rand(2, 1, 6, 6) > 0.4
    keep[..., 0] = True
    keep[1, 0, 3] = False  # one fully masked query row in batch item 1 (all heads)
    if kind == "bool":
        mask: Tensor = keep
    elif kind == "additive":
        mask = torch.zeros(2, 1, 6, 6).masked_fill(~keep, float("-inf")) + 0.3 * torch.randn(2, 1, 6, 6)
    else:
        keep = torch.rand(6, 6) > 0.3
        keep[:, 0] = True
        keep[2] = False
        mask = keep
    rec, _ = _check_against_torch(m, x, None, mask)
    n_rows_masked = 4 if kind != "bool_2d" else 2 * 4
    assert int(rec.n_masked_rows) == n_rows_masked
    assert int(torch.isnan(rec.theta.upper).sum()) == n_rows_masked
    assert int(rec.n_nonfinite_rows) == 0


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_sdpa_temperature_leaves_an_additive_mask_undivided(tau: float) -> None:
    # The kernel is handed q / tau, so a finite additive mask (a position bias) is added undivided; the
    # measured rows must be those of the kernel: softmax(q k^T scale / tau + mask), here from torch itself.
    torch.manual_seed(3)
    m = KernelAttention(is_causal=False)
    with torch.no_grad():
        m.q_proj.weight.mul_(4)
    x = torch.randn(2, 6, 16)
    mask = 2.0 * torch.randn(2, 1, 6, 6)
    probe = AttentionProbe(m, rows_per_head=None)
    probe.set_temperature(tau)
    with torch.no_grad(), probe.capture():
        m(x, None, mask)
    probe.set_temperature(1.0)
    rec = probe.layers[0]
    assert rec.theta is not None
    probs = sdpa_probs(m.last["q"] / tau, m.last["k"], attn_mask=mask)
    want = balanced_mass_factor(probs.double(), validate=False)
    torch.testing.assert_close(rec.theta.upper.double(), want.upper, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.theta.lower.double(), want.lower, atol=1e-5, rtol=0)
    # dividing the mask too (what the sampled logits used to do) gives other rows: the check can tell
    divided = sdpa_probs(m.last["q"] / tau, m.last["k"], attn_mask=mask / tau)
    other = balanced_mass_factor(divided.double(), validate=False)
    assert (other.upper - want.upper).abs().max() > 1e-3


def test_sdpa_gqa() -> None:
    torch.manual_seed(2)
    m = KernelAttention(d=32, n_head=4, n_kv=2, enable_gqa=True, is_causal=True)
    rec, _ = _check_against_torch(m, torch.randn(2, 7, 32), None, None)
    w = rec.weights()
    assert (w.n_heads, w.n_kv_heads, w.head_dim) == (4, 2, 8)
    assert w.per_head()["k"].shape == (2, 8, 32)


def test_nonfinite_rows_are_counted_not_crashing() -> None:
    torch.manual_seed(3)
    m = KernelAttention(is_causal=True)
    x = torch.randn(2, 5, 16)
    x[1, 2] = float("nan")
    probe = AttentionProbe(m, rows_per_head=None)
    with torch.no_grad(), probe.capture():
        m(x)
    rec = probe.layers[0]
    # item 1: rows 2..4 see the NaN key; row 2 also has a NaN query
    assert int(rec.n_nonfinite_rows) == 3 * 4
    assert rec.theta.upper[0].isfinite().all()
    assert torch.isnan(rec.theta.upper[1, :, 2:]).all()
    assert rec.theta.upper[1, :, :2].isfinite().all()


def test_sampling_is_deterministic_and_respects_options(nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt(n_layer=3).eval()
    x = torch.randint(0, 50, (4, 12))

    def run(**kw: Any) -> AttentionProbe:
        probe = AttentionProbe(model, **kw)
        with torch.no_grad(), probe.capture():
            model(x)
        return probe

    a, b = run(rows_per_head=5, seed=7), run(rows_per_head=5, seed=7)
    for ra, rb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(ra.query_positions, rb.query_positions)
        torch.testing.assert_close(ra.theta.upper, rb.theta.upper, equal_nan=True)
        pos = ra.query_positions
        assert pos.shape == (4, 4, 5)
        assert bool((pos.diff(dim=-1) > 0).all())  # distinct, sorted
    c = run(rows_per_head=5, seed=8)
    assert not torch.equal(a.layers[0].query_positions, c.layers[0].query_positions)
    d = run(rows_per_head=3, heads=[1, 3], batch_size=2, layers=[0, "transformer.h.2.attn"])
    assert [r.name for r in d.layers] == ["transformer.h.0.attn", "transformer.h.2.attn"]
    assert [r.index for r in d.layers] == [0, 2]
    assert d.layers[0].theta.upper.shape == (2, 2, 3)
    assert d.layers[0].head_index.tolist() == [1, 3]
    # the sampled rows of selected heads equal the same rows measured with every row
    full = run(rows_per_head=None)
    rec, ref = d.layers[1], full.layers[2]
    want = ref.theta.upper[:2][:, [1, 3]].gather(2, rec.query_positions)
    torch.testing.assert_close(rec.theta.upper, want)


def test_invalid_arguments() -> None:
    model = NanoGPT()
    for kw in (
        {"rows_per_head": 0},
        {"batch_size": 0},
        {"exact_top": 0},
        {"heads": 0},
        {"heads": [9]},
        {"layers": [5]},
        {"layers": ["nope"]},
    ):
        with pytest.raises(ValueError):
            AttentionProbe(model, **kw)  # type: ignore[arg-type]
    probe = AttentionProbe(model)
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            probe.set_temperature(tau)


def test_no_attention_raises_with_guidance() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"(?s)no attention module.*Linear.*register_adapter"):
        AttentionProbe(model)


class OddAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def test_unsupported_attention_warns_once() -> None:
    model = nn.ModuleDict({"a": OddAttention(), "b": OddAttention(), "c": KernelAttention()})
    with pytest.warns(UserWarning, match="no attention adapter") as record:
        probe = AttentionProbe(model)
    msgs = [str(w.message) for w in record if "no attention adapter" in str(w.message)]
    assert len(msgs) == 1
    assert "a (OddAttention)" in msgs[0]
    assert "b (OddAttention)" in msgs[0]
    assert "register_adapter" in msgs[0]
    assert [r.name for r in probe.layers] == ["c"]


def test_registered_adapter_wins_and_shared_qk() -> None:
    class SharedQK(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qk, self.v, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            qk = self.qk(x).view(1, -1, 2, 4).transpose(1, 2)
            v = self.v(x).view(1, -1, 2, 4).transpose(1, 2)
            return self.o(F.scaled_dot_product_attention(qk, qk, v).transpose(1, 2).reshape(1, -1, 8))

    @register_adapter
    class SharedAdapter(AttentionAdapter):
        kind, route = "shared", "sdpa"

        @classmethod
        def matches(cls, module: nn.Module) -> bool:
            return isinstance(module, SharedQK)

        def __init__(self, module: nn.Module, name: str) -> None:
            super().__init__(module, name)
            self.n_heads = self.n_kv_heads = 2
            self.head_dim = 4

        def projection_weights(self) -> ProjectionWeights:
            m = self.module
            w = m.qk.weight.detach()
            return ProjectionWeights(w, w, m.v.weight.detach(), m.o.weight.detach(), 2, 2, 4)

    try:
        assert (
            registered_adapters()[0] is SharedAdapter
            or SharedAdapter.priority <= registered_adapters()[0].priority
        )
        model = nn.ModuleList([SharedQK()])
        probe = AttentionProbe(model, rows_per_head=None)
        with probe.capture():
            model[0](torch.randn(1, 5, 8))
        rec = probe.layers[0]
        assert rec.kind == "shared"
        assert rec.path_length_m == 3
        assert rec.weights().shared_qk
        assert rec.theta.upper.shape == (1, 2, 5)
    finally:
        unregister_adapter(SharedAdapter)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_nothing_installed_outside_capture_and_outputs_bitwise(nanogpt: Callable[..., NanoGPT]) -> None:
    for flash in (True, False):
        model = nanogpt(flash=flash).eval()
        x = torch.randint(0, 50, (2, 9))
        y0 = model(x)
        probe = AttentionProbe(model, rows_per_head=3)
        assert _hook_count(model) == 0
        assert not probe.is_installed
        with probe.capture():
            assert _hook_count(model) > 0
            y1 = model(x)
        assert _hook_count(model) == 0
        assert torch.equal(y0, y1)  # measuring at tau == 1 leaves the forward bitwise unchanged
        assert torch.equal(model(x), y0)
        probe.set_temperature(2.0)
        assert _hook_count(model) > 0
        with probe.capture():
            model(x)
        assert _hook_count(model) > 0  # the temperature keeps its hooks after a capture
        probe.set_temperature(1.0)
        assert _hook_count(model) == 0
        assert torch.equal(model(x), y0)

        # an exception inside the forward still pops the kernel mode and removes the hooks
        def boom(m: nn.Module, a: Any, out: Tensor) -> None:
            raise RuntimeError("boom")

        bad = model.transformer.h[1].attn.c_proj.register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"), probe.capture():
            model(x)
        bad.remove()
        assert _hook_count(model) == 0
        assert torch.equal(model(x), y0)
        assert torch._C._len_torch_function_stack() == 0


def test_capture_leaves_global_rng_and_dropout_stream_alone(nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt(dropout=0.2, n_layer=2).train()
    x = torch.randint(0, 50, (2, 12))
    torch.manual_seed(123)
    y0 = model(x)
    state0 = torch.get_rng_state()
    probe = AttentionProbe(model, rows_per_head=4)
    torch.manual_seed(123)
    with probe.capture():
        y1 = model(x)
    assert torch.equal(torch.get_rng_state(), state0)
    assert torch.equal(y0, y1)


def test_residual_and_input_norms(nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt(post_ln=False).eval()
    x = torch.randint(0, 50, (2, 8))
    ins: list[Tensor] = []
    att_in: list[Tensor] = []
    hs = [b.register_forward_pre_hook(lambda m, a: ins.append(a[0])) for b in model.transformer.h]
    hs += [b.attn.register_forward_pre_hook(lambda m, a: att_in.append(a[0])) for b in model.transformer.h]
    probe = AttentionProbe(model)
    with torch.no_grad(), probe.capture():
        model(x)
    for h in hs:
        h.remove()
    for rec, r, u in zip(probe.layers, ins, att_in, strict=True):
        assert rec.block_name == rec.name.rsplit(".", 1)[0]
        assert rec.norm_placement == "pre"
        torch.testing.assert_close(rec.residual_max_norm, torch.linalg.vector_norm(r, dim=-1).max())
        torch.testing.assert_close(rec.attn_input_max_norm, torch.linalg.vector_norm(u, dim=-1).max())
    post = nanogpt(post_ln=True).eval()
    probe = AttentionProbe(post)
    with torch.no_grad(), probe.capture():
        post(x)
    assert [r.norm_placement for r in probe.layers] == ["post", "post"]
    lone = nn.ModuleDict({"attn": KernelAttention()})
    probe = AttentionProbe(lone)
    with probe.capture():
        lone["attn"](torch.randn(1, 4, 16))
    assert probe.layers[0].residual_max_norm is None
    assert probe.layers[0].norm_placement == "none"


def test_softmax_route_hand_written(nanogpt: Callable[..., NanoGPT]) -> None:
    """nanoGPT's manual path (masked_fill -inf + F.softmax) against an independent recomputation."""
    model = nanogpt(flash=False).eval()
    with torch.no_grad():
        for b in model.transformer.h:
            b.attn.c_attn.weight.mul_(8)
    x = torch.randint(0, 50, (2, 10))
    u_in: list[Tensor] = []
    hs = [b.attn.register_forward_pre_hook(lambda m, a: u_in.append(a[0])) for b in model.transformer.h]
    probe = AttentionProbe(model, rows_per_head=None)
    with torch.no_grad(), probe.capture():
        model(x)
    for h in hs:
        h.remove()
    for rec, u, blk in zip(probe.layers, u_in, model.transformer.h, strict=True):
        q, k, _ = blk.attn.c_attn(u).split(32, dim=2)
        q = q.view(2, 10, 4, 8).transpose(1, 2)
        k = k.view(2, 10, 4, 8).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        logits = logits.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
        want = balanced_mass_factor(torch.softmax(logits.double(), -1), validate=False)
        torch.testing.assert_close(rec.theta.upper.double(), want.upper, atol=1e-5, rtol=0)
        assert rec.kind == "nanogpt"


def test_generic_matching_is_conservative() -> None:
    class NoKernel(nn.Module):  # right attributes, but never calls an attention kernel
        def __init__(self) -> None:
            super().__init__()
            self.n_head = 2
            self.c_attn, self.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.c_proj(self.c_attn(x)[..., :8])

    class WrongShape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n_head = 3
            self.c_attn, self.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(x, x, x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in (NoKernel(), WrongShape()):
            with pytest.raises(ValueError):
                AttentionProbe(nn.ModuleList([mod]))


def test_failed_measurement_is_reported_once_and_training_goes_on(nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt().eval()
    x = torch.randint(0, 50, (2, 8))
    y0 = model(x)
    probe = AttentionProbe(model, rows_per_head=3)
    real = probe._record

    def flaky(ctx: Any, *args: Any) -> None:
        if ctx.layer.index == 1:
            raise RuntimeError("synthetic failure")
        real(ctx, *args)

    probe._record = flaky  # type: ignore[method-assign]
    probe.set_temperature(2.0)

    def measure() -> Tensor:
        with probe.capture():
            return model(x)  # type: ignore[no-any-return]

    with pytest.warns(UserWarning, match=r"transformer\.h\.1\.attn.*synthetic failure") as record:
        y = measure()
    y = measure()  # no second warning
    assert len([w for w in record if "synthetic" in str(w.message)]) == 1
    assert probe.layers[1].disabled
    assert probe.layers[1].theta is None
    assert probe.layers[0].n_captures == 2
    probe.set_temperature(1.0)
    with probe.temperature_active(2.0):
        torch.testing.assert_close(model(x), y)  # the temperature was applied on the failing layer too
    assert torch.equal(model(x), y0)
    strict = AttentionProbe(model, strict=True)
    strict._record = flaky  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="synthetic"), strict.capture():
        model(x)


def test_temperature_changed_inside_capture(nanogpt: Callable[..., NanoGPT]) -> None:
    model = nanogpt().eval()
    probe = AttentionProbe(model)
    with probe.capture():
        probe.set_temperature(2.0)
    assert probe.is_installed  # tau != 1 keeps the hooks after the capture
    with probe.capture():
        probe.set_temperature(1.0)
    assert not probe.is_installed


def test_state_dict_resumes_row_sampling() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 12, 16)
    first = AttentionProbe(model, rows_per_head=3, seed=5)
    for _ in range(3):
        with first.capture():
            model(x)
    state = first.state_dict()
    with first.capture():
        model(x)
    expected = first.layers[0].query_positions.clone()
    resumed = AttentionProbe(model, rows_per_head=3, seed=5)
    resumed.load_state_dict(state)
    with resumed.capture():
        model(x)
    assert torch.equal(resumed.layers[0].query_positions, expected)
    fresh = AttentionProbe(model, rows_per_head=3, seed=5)
    with fresh.capture():
        model(x)
    assert not torch.equal(fresh.layers[0].query_positions, expected)


def _captured_rows(probe: AttentionProbe, model: nn.Module, x: Tensor) -> list[tuple[Tensor, ...]]:
    with probe.capture():
        model(x)
    out = []
    for rec in probe.layers:
        assert rec.theta is not None
        assert rec.entropy is not None
        assert rec.max_logit is not None
        out.append((rec.theta.lower, rec.theta.upper, rec.entropy, rec.max_logit))
    return out


@pytest.fixture
def accelerator_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows of all layers wait for one joint bracket, as on a GPU (CPU rows are measured at once)."""
    import thetascope.capture.probe as probe_module

    monkeypatch.setattr(probe_module, "_defers", lambda device: True)


@pytest.mark.parametrize("budget", [1 << 24, 3500])  # all layers at the end; two layers per settlement
def test_rows_measured_together_equal_rows_measured_call_by_call(
    monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    import thetascope.capture.probe as probe_module

    torch.manual_seed(0)
    model = NanoGPT(n_layer=4)
    x = torch.randint(0, 50, (3, 16))
    apart = _captured_rows(AttentionProbe(model, rows_per_head=8, seed=3), model, x)  # the CPU policy
    monkeypatch.setattr(probe_module, "_defers", lambda device: True)
    monkeypatch.setattr(probe_module, "_PENDING_ELEMENTS", budget)
    calls = []
    real = probe_module.AttentionProbe._settle

    def counting(self: AttentionProbe) -> None:
        calls.append(len(self._pending))
        real(self)

    monkeypatch.setattr(probe_module.AttentionProbe, "_settle", counting)
    together = _captured_rows(AttentionProbe(model, rows_per_head=8, seed=3), model, x)
    assert max(calls) == (4 if budget == 1 << 24 else 2)  # really measured together
    for a, b in zip(together, apart):
        for ta, tb in zip(a, b):
            assert torch.equal(ta.nan_to_num(-1.0), tb.nan_to_num(-1.0))


@pytest.mark.usefixtures("accelerator_policy")
def test_a_bracket_failure_while_measuring_together_disables_only_its_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import thetascope.functional.theta as theta_module

    torch.manual_seed(0)
    model = NanoGPT(n_layer=3)
    x = torch.randint(0, 50, (2, 16))
    expected = _captured_rows(AttentionProbe(model, rows_per_head=4, seed=1), model, x)
    real = theta_module.balanced_mass_factor
    calls = []

    def flaky(probs: Tensor, **kwargs: Any) -> Any:
        calls.append(probs.shape)
        if len(calls) in (1, 3):  # the stacked call of all layers, then layer 1's own call
            raise RuntimeError("bracket exploded")
        return real(probs, **kwargs)

    monkeypatch.setattr(theta_module, "balanced_mass_factor", flaky)
    probe = AttentionProbe(model, rows_per_head=4, seed=1)
    with pytest.warns(UserWarning, match="bracket exploded"), probe.capture():
        model(x)
    assert [r.disabled for r in probe.layers] == [False, True, False]
    for i in (0, 2):
        theta = probe.layers[i].theta
        assert theta is not None
        assert torch.equal(theta.upper, expected[i][1])
    assert len(calls) == 4
    strict = AttentionProbe(model, rows_per_head=4, seed=1, strict=True)
    calls.clear()
    with pytest.raises(RuntimeError, match="bracket exploded"), strict.capture():
        model(x)


@pytest.mark.usefixtures("accelerator_policy")
def test_a_forward_that_raises_inside_capture_keeps_its_own_error() -> None:
    torch.manual_seed(0)
    model = NanoGPT(n_layer=2)
    probe = AttentionProbe(model, rows_per_head=4, strict=True)

    def measured_forward_then_user_error() -> None:
        with probe.capture():
            model(torch.randint(0, 50, (2, 16)))
            raise ValueError("user error")

    with pytest.raises(ValueError, match="user error"):
        measured_forward_then_user_error()
    assert probe._pending == []
    with probe.capture():  # the next capture measures normally
        model(torch.randint(0, 50, (2, 16)))
    assert all(r.theta is not None for r in probe.layers)


def test_selects_all_is_true_only_for_every_item_and_head_in_order() -> None:
    model = NanoGPT(n_layer=1)
    assert AttentionProbe(model)._selects_all(3, 4) == (True, True)
    assert AttentionProbe(model, batch_size=3, heads=[0, 1, 2, 3])._selects_all(3, 4) == (True, True)
    assert AttentionProbe(model, batch_size=2, heads=[1, 0, 2, 3])._selects_all(3, 4) == (False, False)
    assert AttentionProbe(model, heads=2)._selects_all(3, 4) == (True, False)


class _ValidAttention(nn.Module):
    """Eager attention whose adapter records every row and marks odd query rows as not valid."""

    def __init__(self, d: int = 8, h: int = 2) -> None:
        super().__init__()
        self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.last: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
        self.last = logits.detach()
        return self.o((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("joint", [False, True])
def test_rows_marked_not_valid_count_as_masked(
    monkeypatch: pytest.MonkeyPatch, joint: bool, head_major: bool
) -> None:
    import thetascope.capture.probe as probe_module

    class ValidAdapter(AttentionAdapter):
        kind, route = "valid_rows", "softmax"

        @classmethod
        def matches(cls, module: nn.Module) -> bool:
            return isinstance(module, _ValidAttention)

        def __init__(self, module: nn.Module, name: str) -> None:
            super().__init__(module, name)
            self.n_heads, self.n_kv_heads, self.head_dim = 2, 2, 4

        def projection_weights(self) -> ProjectionWeights:
            wq, wk, wv = self.module.qkv.weight.detach().split(8)
            return ProjectionWeights(wq, wk, wv, self.module.o.weight.detach(), 2, 2, 4)

        def handle(
            self, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], ctx: Any
        ) -> Any:
            x = args[0]
            if ctx.recording:
                pos = ctx.sample_rows(x.shape[0], x.shape[1], x.shape[2], x.device)
                rows = x.detach().gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
                valid = pos % 2 == 0
                if head_major:  # the same values, laid out [H', B', ...] in memory (measured without a copy)
                    rows = rows.transpose(0, 1).contiguous().transpose(0, 1)
                    valid = valid.transpose(0, 1).contiguous().transpose(0, 1)
                ctx.record_logits(rows, pos, valid=valid)
            return func(*args, **kwargs)

    if joint:
        monkeypatch.setattr(probe_module, "_defers", lambda device: True)
    register_adapter(ValidAdapter)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(_ValidAttention(), _ValidAttention(), _ValidAttention())
        probe = AttentionProbe(model, rows_per_head=None)
        with torch.no_grad(), probe.capture():
            model(torch.randn(2, 7, 8))
        for layer, rec in zip(model, probe.layers, strict=True):
            assert rec.kind == "valid_rows"
            assert rec.theta is not None
            assert rec.entropy is not None
            assert layer.last is not None
            odd = torch.arange(7) % 2 == 1  # positions 1, 3, 5 of every item and head
            assert int(rec.n_masked_rows) == 2 * 2 * 3
            assert int(rec.n_nonfinite_rows) == 0
            assert rec.theta.upper[..., odd].isnan().all()
            assert rec.entropy[..., odd].isnan().all()
            want = balanced_mass_factor(layer.last.softmax(-1).double(), validate=False)
            torch.testing.assert_close(
                rec.theta.upper[..., ~odd].double(), want.upper[..., ~odd], atol=1e-5, rtol=0
            )
    finally:
        unregister_adapter(ValidAdapter)
