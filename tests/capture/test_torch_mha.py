"""torch nn.MultiheadAttention adapter: theta against the module's own materialised attention weights.

References are independent of the probe: attention weights returned by the module itself
(``need_weights=True, average_attn_weights=False``), SVD of the weight slices the module uses, and a deep copy
whose query projection was scaled by 1/tau by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.capture.conftest import mha_scaled_copy
from thetascope.capture import AttentionProbe
from thetascope.capture import probe as probe_module
from thetascope.capture.torch_mha import TorchMHAAdapter, mha_fastpath_disabled
from thetascope.functional.theta import balanced_mass_factor

TOL = 1e-5

pytestmark = pytest.mark.filterwarnings(
    "ignore:enable_nested_tensor is True:UserWarning",
    "ignore:The PyTorch API of nested tensors:UserWarning",
)


def _rows(weights: Tensor, pos: Tensor) -> Tensor:
    """Rows ``pos`` [B, H, R] of attention weights [B, H, L, S]."""
    return weights.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, weights.shape[-1]))


def assert_theta_matches(rec: Any, weights: Tensor) -> None:
    """The probe's bracket equals the bracket of the model's own attention rows (same sampled rows)."""
    assert rec.theta is not None
    assert rec.query_positions is not None
    ref = balanced_mass_factor(_rows(weights.detach().float(), rec.query_positions), validate=False)
    for got, want in ((rec.theta.lower, ref.lower), (rec.theta.upper, ref.upper)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, equal_nan=True)


def _mha(embed: int = 16, heads: int = 4, **kw: Any) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(embed, heads, **kw)
    with torch.no_grad():  # non-zero biases so that every bias path matters
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    return m


def _causal_bool(n: int) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


L, B, E, H = 9, 3, 16, 4


def _case(name: str) -> tuple[nn.MultiheadAttention, tuple[Tensor, ...], dict[str, Any]]:
    """A module and the arguments of one call (inputs in the module's layout)."""
    g = torch.Generator().manual_seed(1)
    x_bf = torch.randn(B, L, E, generator=g) * 2
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 6:] = True
    kpm[2, 3:] = True
    if name == "plain":
        return _mha(batch_first=True), (x_bf, x_bf, x_bf), {}
    if name == "kpm_bool_seq_first":
        x = x_bf.transpose(0, 1)
        return _mha(), (x, x, x), {"key_padding_mask": kpm}
    if name == "kpm_float":
        return _mha(batch_first=True), (x_bf, x_bf, x_bf), {"key_padding_mask": kpm.float() * -1e4}
    if name == "causal_bool":
        return _mha(batch_first=True), (x_bf, x_bf, x_bf), {"attn_mask": _causal_bool(L), "is_causal": True}
    if name == "causal_float_kpm":
        mask = torch.zeros(L, L).masked_fill(_causal_bool(L), float("-inf"))
        kpm_f = torch.zeros(B, L).masked_fill(kpm, float("-inf"))
        return _mha(batch_first=True), (x_bf, x_bf, x_bf), {"attn_mask": mask, "key_padding_mask": kpm_f}
    if name == "float_mask_2d":
        mask = torch.randn(L, L, generator=g)
        return _mha(batch_first=True), (x_bf, x_bf, x_bf), {"attn_mask": mask}
    if name == "bool_mask_3d":
        mask = torch.rand(B * H, L, L, generator=g) < 0.4
        mask &= ~torch.eye(L, dtype=torch.bool)  # keep the diagonal: no fully masked row
        x = x_bf.transpose(0, 1)
        return _mha(), (x, x, x), {"attn_mask": mask}
    if name == "cross_kdim":
        mem = torch.randn(B, 5, 10, generator=g)
        mkpm = torch.zeros(B, 5, dtype=torch.bool)
        mkpm[0, 4] = True
        m = _mha(batch_first=True, kdim=10, vdim=10)
        return m, (x_bf, mem, mem), {"key_padding_mask": mkpm}
    if name == "bias_kv_zero_attn":
        m = _mha(batch_first=True, add_bias_kv=True, add_zero_attn=True)
        return m, (x_bf, x_bf, x_bf), {"attn_mask": _causal_bool(L), "key_padding_mask": kpm}
    if name == "strided_seq_first":  # [L, B, E] contiguous in neither token order
        x = x_bf.permute(2, 1, 0).contiguous().permute(1, 2, 0)
        assert not x.is_contiguous()
        assert not x.transpose(0, 1).is_contiguous()
        return _mha(), (x, x, x), {"attn_mask": _causal_bool(L), "key_padding_mask": kpm}
    if name == "unbatched":
        x = x_bf[0]
        return _mha(), (x, x, x), {"attn_mask": _causal_bool(L)}
    raise AssertionError(name)


CASES = [
    "plain",
    "kpm_bool_seq_first",
    "kpm_float",
    "causal_bool",
    "causal_float_kpm",
    "float_mask_2d",
    "bool_mask_3d",
    "cross_kdim",
    "bias_kv_zero_attn",
    "strided_seq_first",
    "unbatched",
]


@pytest.mark.parametrize("case", CASES)
def test_theta_equals_materialised_weights(case: str) -> None:
    m, args, kwargs = _case(case)
    probe = AttentionProbe(m, rows_per_head=4)
    assert [r.kind for r in probe.layers] == ["torch_mha"]
    with probe.capture():
        out, w = m(*args, **kwargs, need_weights=True, average_attn_weights=False)
    assert w is not None
    if w.dim() == 3:  # unbatched
        w = w.unsqueeze(0)
    rec = probe.layers[0]
    assert rec.theta is not None
    assert rec.theta.upper.shape == (w.shape[0], H, 4)
    assert_theta_matches(rec, w)
    assert int(rec.n_nonfinite_rows) == 0
    # tau == 1: the captured call is bitwise the unhooked one
    out0, w0 = m(*args, **kwargs, need_weights=True, average_attn_weights=False)
    assert torch.equal(out, out0)
    assert torch.equal(w, w0 if w0.dim() == 4 else w0.unsqueeze(0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_sdpa_causal_path(batch_first: bool) -> None:
    """need_weights=False + is_causal, no padding: the kernel drops the mask and asks SDPA for causality."""
    m = _mha(batch_first=batch_first)
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    mask = _causal_bool(L)
    probe = AttentionProbe(m, rows_per_head=None)
    with probe.capture():
        out = m(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
    _, w = m(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    assert_theta_matches(probe.layers[0], w)
    assert torch.equal(out, m(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0])
    # row 0 attends one key: theta is exactly 0 there
    assert float(probe.layers[0].theta.upper[:, :, 0].abs().max()) == 0.0


def test_sdpa_causal_path_ignores_nan_in_future_keys() -> None:
    """A NaN token makes the rows that attend to it non-finite, not the earlier rows the causal mask hides it
    from (torch's CPU kernel itself returns NaN on those too: it multiplies the masked NaN values by 0)."""
    m = _mha(batch_first=True)
    x = torch.randn(B, L, E)
    x[1, 3] = float("nan")
    mask = _causal_bool(L)
    probe = AttentionProbe(m, rows_per_head=None)
    with torch.no_grad(), probe.capture():
        m(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    rec = probe.layers[0]
    theta = rec.theta.upper
    assert theta[0].isfinite().all()
    assert theta[1, :, :3].isfinite().all()
    assert theta[1, :, 3:].isnan().all()
    assert int(rec.n_nonfinite_rows) == H * (L - 3)


def test_fully_masked_rows_are_counted() -> None:
    m = _mha(batch_first=True)
    x = torch.randn(2, L, E)
    mask = torch.zeros(2 * H, L, L, dtype=torch.bool)
    mask[0, 3, :] = True  # batch 0, head 0, query 3 sees nothing
    probe = AttentionProbe(m, rows_per_head=None)
    with probe.capture():
        m(x, x, x, attn_mask=mask)
    rec = probe.layers[0]
    assert int(rec.n_masked_rows) == 1
    assert torch.isnan(rec.theta.upper[0, 0, 3])
    assert int(torch.isnan(rec.theta.upper).sum()) == 1


def _close(got: Tensor | None, want: Tensor | None) -> None:
    """Float agreement relative to the tensor's scale (gradients mix many rounding errors)."""
    assert got is not None
    assert want is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("case", ["kpm_bool_seq_first", "float_mask_2d", "cross_kdim", "bias_kv_zero_attn"])
def test_temperature_matches_scaled_query_projection(case: str) -> None:
    tau = 2.5
    m, args, kwargs = _case(case)
    m.train()  # dropout is 0: deterministic, and gradients flow
    ref = mha_scaled_copy(m, tau)
    probe = AttentionProbe(m, rows_per_head=4)
    probe.set_temperature(tau)
    out = m(*args, **kwargs)[0]
    want = ref(*args, **kwargs)[0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    # autograd reaches the live parameters through the scaled copy: dL/dW_Q = dL/dW_Q' / tau
    out.square().sum().backward()
    want.square().sum().backward()
    _close(m.out_proj.weight.grad, ref.out_proj.weight.grad)
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        g, gr = m.in_proj_weight.grad, ref.in_proj_weight.grad
        assert g is not None
        assert gr is not None
        _close(g[:e], gr[:e] / tau)
        _close(g[e:], gr[e:])
    else:
        _close(m.q_proj_weight.grad, ref.q_proj_weight.grad / tau)
    # capture under temperature: theta of the rows the tempered model computes
    with probe.capture():
        m(*args, **kwargs)
    _, w = ref(*args, **kwargs, need_weights=True, average_attn_weights=False)
    assert_theta_matches(probe.layers[0], w)
    # back to tau == 1: hooks removed, bitwise the unhooked module
    probe.set_temperature(1.0)
    assert not probe.is_installed
    m2 = copy.deepcopy(m)
    assert torch.equal(m(*args, **kwargs)[0], m2(*args, **kwargs)[0])


class _KernelModeCounter:
    """Counts the probe's kernel modes entered (each forward the probe intercepts enters one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        orig = probe_module._KernelMode.__enter__

        def enter(mode: Any) -> Any:
            self.n += 1
            return orig(mode)

        monkeypatch.setattr(probe_module._KernelMode, "__enter__", enter)


@pytest.mark.parametrize("case", ["kpm_bool_seq_first", "cross_kdim", "bias_kv_zero_attn"])
def test_unrecorded_temperature_is_the_intercepted_one_without_a_mode(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tau = 2.5
    m, args, kwargs = _case(case)
    m.train()
    twin = copy.deepcopy(m)
    probe, twin_probe = AttentionProbe(m), AttentionProbe(twin)
    probe.set_temperature(tau)
    twin_probe.set_temperature(tau)
    try:
        _check_shadow_against_interception(m, twin, twin_probe, args, kwargs, monkeypatch)
    finally:  # hooks off: the MHA fast path (a process-wide setting) back on for the other tests
        probe.set_temperature(1.0)
        twin_probe.set_temperature(1.0)


def _check_shadow_against_interception(
    m: nn.MultiheadAttention,
    twin: nn.MultiheadAttention,
    twin_probe: AttentionProbe,
    args: tuple[Tensor, ...],
    kwargs: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = dict(m.named_parameters())
    # the twin takes the interception route (what every forward took before the shadow)
    monkeypatch.setattr(twin_probe._contexts[0].adapter, "enter_temperature", lambda module, ctx: None)
    modes = _KernelModeCounter(monkeypatch)
    out = m(*args, **kwargs)[0]
    assert modes.n == 0
    want = twin(*args, **kwargs)[0]
    assert modes.n == 1
    assert torch.equal(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    for name, p in m.named_parameters():
        twin_grad = dict(twin.named_parameters())[name].grad
        assert p.grad is not None
        assert twin_grad is not None
        assert torch.equal(p.grad, twin_grad), name
    # nothing of the shadow is left: the parameters are the registered ones, the state dict unchanged
    shadowed = ("in_proj_weight", "q_proj_weight", "in_proj_bias")
    assert not any(n in vars(m) for n in shadowed)
    assert dict(m.named_parameters()) == params
    assert all(getattr(m, n) is p for n, p in params.items() if "." not in n)
    assert m.state_dict().keys() == twin.state_dict().keys()
    # a forward that raises takes the shadow off too
    with pytest.raises(Exception):  # noqa: B017 (any error of the kernel: a wrong embedding size)
        m(args[0][..., :-1], args[1], args[2], **kwargs)
    assert not any(n in vars(m) for n in shadowed)


def test_temperature_reaches_parameters_swapped_in_by_functional_call() -> None:
    # torch.func.functional_call puts other tensors in the registered parameters' places for one call: the
    # shadow must be made of those, not of the module's own parameters
    tau = 2.0
    torch.manual_seed(1)
    m = nn.MultiheadAttention(16, 4, batch_first=True)
    other = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(other[n])
    ref = mha_scaled_copy(ref, tau)
    probe = AttentionProbe(m)
    probe.set_temperature(tau)
    x = torch.randn(2, 5, 16)
    try:
        out = torch.func.functional_call(m, other, (x, x, x), {"need_weights": False})[0]
    finally:
        probe.set_temperature(1.0)
    want = ref(x, x, x, need_weights=False)[0].detach()
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert "in_proj_weight" not in vars(m)


def test_mha_subclass_with_its_own_forward_keeps_the_interception(monkeypatch: pytest.MonkeyPatch) -> None:
    class Wrapped(nn.MultiheadAttention):
        def forward(self, query: Tensor, *args: Any, **kwargs: Any) -> Any:
            return super().forward(query, *args, **kwargs)

    tau = 2.0
    torch.manual_seed(0)
    m = Wrapped(16, 4, batch_first=True)
    ref = mha_scaled_copy(m, tau)
    probe = AttentionProbe(m)
    probe.set_temperature(tau)
    modes = _KernelModeCounter(monkeypatch)
    x = torch.randn(2, 5, 16)
    try:
        out = m(x, x, x, need_weights=False)[0]
    finally:
        probe.set_temperature(1.0)
    assert modes.n == 1
    torch.testing.assert_close(out, ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kdim", [None, 10])
def test_projection_weights_match_module_slices(kdim: int | None) -> None:
    m = _mha(kdim=kdim, vdim=kdim)
    probe = AttentionProbe(m)
    pw = probe.layers[0].weights()
    assert (pw.n_heads, pw.n_kv_heads, pw.head_dim) == (H, H, E // H)
    assert not pw.shared_qk
    assert probe.layers[0].path_length_m == 4
    if kdim is None:
        assert m.in_proj_weight is not None
        used = dict(zip("qkv", m.in_proj_weight.detach().chunk(3)))
    else:
        used = {"q": m.q_proj_weight.detach(), "k": m.k_proj_weight.detach(), "v": m.v_proj_weight.detach()}
    per_head = pw.per_head()
    dh = E // H
    for key in "qkv":
        full = used[key]
        assert torch.equal(getattr(pw, f"w_{key}"), full)
        want = torch.linalg.svdvals(full)[0]
        got = torch.linalg.matrix_norm(getattr(pw, f"w_{key}"), ord=2)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for h in range(H):
            sl = full[h * dh : (h + 1) * dh]
            torch.testing.assert_close(
                torch.linalg.matrix_norm(per_head[key][h], ord=2),
                torch.linalg.svdvals(sl)[0],
                rtol=1e-6,
                atol=0,
            )
    w_o = m.out_proj.weight.detach()
    for h in range(H):
        torch.testing.assert_close(
            torch.linalg.matrix_norm(per_head["o"][h], ord=2),
            torch.linalg.svdvals(w_o[:, h * dh : (h + 1) * dh])[0],
            rtol=1e-6,
            atol=0,
        )
    # views of the live parameters: an in-place update is visible
    with torch.no_grad():
        m.out_proj.weight.mul_(2)
    assert torch.equal(probe.layers[0].weights().w_o, m.out_proj.weight.detach())


# --------------------------------------------------------------------------------------------- nn.Transformer


def _transformer(norm_first: bool, batch_first: bool) -> nn.Transformer:
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=16,
        nhead=2,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=32,
        dropout=0.0,
        norm_first=norm_first,
        batch_first=batch_first,
    )


def _transformer_inputs(batch_first: bool) -> tuple[tuple[Tensor, Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randn(3, 7, 16, generator=g), torch.randn(3, 6, 16, generator=g)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True  # left-aligned padding (the nested-tensor fast path accepts it)
    pad[2, 4:] = True
    kw = {
        "src_key_padding_mask": pad,
        "memory_key_padding_mask": pad,
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(6),
        "tgt_is_causal": True,
    }
    return (src, tgt), kw


@contextmanager
def _recorded_calls(model: nn.Module) -> Iterator[dict[str, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Record the arguments every nn.MultiheadAttention receives (test-owned hooks, removed on exit)."""
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):

            def pre(mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
                calls[name] = (args, dict(kwargs))

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def reference_weights(
    model: nn.Module, run: Callable[[], Any]
) -> tuple[dict[str, Tensor], dict[str, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Each MHA's own materialised weights on the inputs it receives in ``run`` (slow path, no probe)."""
    with mha_fastpath_disabled(), _recorded_calls(model) as calls:
        run()
    modules = dict(model.named_modules())
    out = {}
    with mha_fastpath_disabled(), torch.no_grad():
        for name, (args, kwargs) in calls.items():
            kw = {**kwargs, "need_weights": True, "average_attn_weights": False}
            w = modules[name](*args, **kw)[1]
            out[name] = w
    return out, calls


MHA_NAMES = [
    "encoder.layers.0.self_attn",
    "encoder.layers.1.self_attn",
    "decoder.layers.0.self_attn",
    "decoder.layers.0.multihead_attn",
    "decoder.layers.1.self_attn",
    "decoder.layers.1.multihead_attn",
]


@pytest.mark.parametrize(
    ("norm_first", "batch_first", "mode"),
    [
        (False, True, "eval_no_grad"),  # nested-tensor + fused encoder-layer fast paths outside capture
        (False, False, "eval_no_grad"),
        (True, True, "eval_no_grad"),
        (True, False, "train"),
        (False, True, "train"),
    ],
)
def test_transformer_layers(norm_first: bool, batch_first: bool, mode: str) -> None:
    model = _transformer(norm_first, batch_first)
    (src, tgt), kw = _transformer_inputs(batch_first)
    model.train(mode == "train")
    grad = torch.enable_grad() if mode == "train" else torch.no_grad()

    def run() -> Tensor:
        with grad:
            return model(src, tgt, **kw)

    weights, calls = reference_weights(model, run)
    with mha_fastpath_disabled():
        slow = run()
    fast = run()  # whatever torch picks (the fused fast path in eval/no_grad)

    probe = AttentionProbe(model, rows_per_head=3)
    assert [r.name for r in probe.layers] == MHA_NAMES
    assert [r.block_name for r in probe.layers] == [n.rsplit(".", 1)[0] for n in MHA_NAMES]
    with probe.capture():
        assert not torch.backends.mha.get_fastpath_enabled()
        out = run()
    assert torch.backends.mha.get_fastpath_enabled()
    assert torch.equal(out, slow)  # tau == 1: bitwise the unhooked slow path
    # the fast path pads with zeros where the slow path computes padded query rows: compare real rows
    torch.testing.assert_close(out, fast, rtol=1e-4, atol=1e-5)
    for rec in probe.layers:
        assert rec.norm_placement == ("pre" if norm_first else "post"), rec.name
        assert_theta_matches(rec, weights[rec.name])
        args, _ = calls[rec.name]
        q, k = args[0], args[1]
        want = torch.cat([q, k], dim=1 if batch_first else 0) if "multihead" in rec.name else q
        torch.testing.assert_close(rec.attn_input_max_norm, want.norm(dim=-1).max(), rtol=1e-6, atol=0)


def test_transformer_temperature_matches_scaled_copy() -> None:
    tau = 3.0
    model = _transformer(norm_first=False, batch_first=True).eval()
    (src, tgt), kw = _transformer_inputs(batch_first=True)
    ref = mha_scaled_copy(model, tau)
    probe = AttentionProbe(model)
    probe.set_temperature(tau)
    with torch.no_grad():  # eval + no_grad + padding: the nested fast path must stay off while tau != 1
        out = model(src, tgt, **kw)
        with mha_fastpath_disabled():
            want = ref(src, tgt, **kw)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    probe.set_temperature(1.0)
    assert torch.backends.mha.get_fastpath_enabled()


# ------------------------------------------------------------------------------------------------ fast path


class _Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.n = 0
        orig = getattr(torch, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.n += 1
            return orig(*args, **kwargs)

        monkeypatch.setattr(torch, name, wrapped)


def test_fast_path_untouched_outside_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    mha = _mha(batch_first=True).eval()
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    counters = {
        n: _Counter(monkeypatch, n) for n in ("_nested_tensor_from_mask", "_native_multi_head_attention")
    }
    layer_fwd = _Counter(monkeypatch, "_transformer_encoder_layer_fwd")

    probe_enc, probe_mha = AttentionProbe(enc, rows_per_head=2), AttentionProbe(mha, rows_per_head=2)

    def plain() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return enc(x, src_key_padding_mask=pad), mha(x, x, x)[0]

    before = plain()
    assert counters["_nested_tensor_from_mask"].n == 1
    assert layer_fwd.n == 2
    assert counters["_native_multi_head_attention"].n == 1
    with probe_enc.capture(), probe_mha.capture():
        during = plain()
    assert counters["_nested_tensor_from_mask"].n == 1
    assert layer_fwd.n == 2
    assert counters["_native_multi_head_attention"].n == 1
    assert all(r.theta is not None for r in probe_enc.layers + probe_mha.layers)
    valid = ~pad
    torch.testing.assert_close(during[0][valid], before[0][valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(during[1], before[1], rtol=1e-4, atol=1e-5)
    # temperature on, then off again: afterwards the fast path is taken exactly as before
    probe_enc.set_temperature(2.0)
    with torch.no_grad():
        enc(x, src_key_padding_mask=pad)
    assert layer_fwd.n == 2
    probe_enc.set_temperature(1.0)
    after = plain()
    assert torch.backends.mha.get_fastpath_enabled()
    assert counters["_nested_tensor_from_mask"].n == 2
    assert layer_fwd.n == 4
    assert counters["_native_multi_head_attention"].n == 2
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[1], before[1])


def test_fastpath_setting_restored_when_user_disabled_it() -> None:
    m = _mha(batch_first=True)
    probe = AttentionProbe(m)
    with mha_fastpath_disabled():
        with probe.capture():
            m(*(torch.randn(1, 3, E),) * 3)
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled()


def test_adapter_is_registered_and_matches_subclasses() -> None:
    class MyMHA(nn.MultiheadAttention):
        pass

    assert TorchMHAAdapter.matches(MyMHA(8, 2))
    assert not TorchMHAAdapter.matches(nn.Linear(2, 2))
    probe = AttentionProbe(nn.Sequential(MyMHA(8, 2)))
    assert probe.layers[0].kind == "torch_mha"


def test_head_and_batch_subsets() -> None:
    """``heads=`` / ``batch_size=``: only the selected items and heads, same values as the full capture."""
    m, args, kwargs = _case("cross_kdim")
    full, sub = (
        AttentionProbe(m, rows_per_head=None),
        AttentionProbe(m, rows_per_head=None, heads=[1, 3], batch_size=2),
    )
    with full.capture():
        _, w = m(*args, **kwargs, need_weights=True, average_attn_weights=False)
    with sub.capture():
        m(*args, **kwargs)
    rec = sub.layers[0]
    assert rec.theta.upper.shape == (2, 2, L)
    assert_theta_matches(rec, w[:2, [1, 3]])
    torch.testing.assert_close(rec.theta.upper, full.layers[0].theta.upper[:2, [1, 3]], atol=1e-6, rtol=0)
