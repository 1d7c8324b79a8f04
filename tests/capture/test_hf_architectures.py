"""The generic Hugging Face route on every architecture of the acceptance list (and a few more).

Each is checked against the model's own eager attention: probabilities (``output_attentions=True``),
pre-softmax logits, projections and the temperature.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from thetascope.capture import AttentionProbe
from thetascope.capture.adapters import SOFTMAX_FUNCS
from thetascope.functional.theta import balanced_mass_factor

pytest.importorskip("transformers")

from tests.capture import hf_zoo as Z

ALL = Z.ACCEPTANCE + Z.EXTRA


class _Softmax4D(TorchFunctionMode):
    """The test's own view of eager attention: the input of every 4-D last-dim softmax, optionally divided by
    ``tau`` (an independent route to "logits / tau"), filed under the attention module running it."""

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau
        self.current: str | None = None
        self.logits: dict[str, list[Tensor]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else None
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if func in SOFTMAX_FUNCS and isinstance(x, Tensor) and x.dim() == 4 and dim in (-1, 3):
            if self.current is not None:
                self.logits.setdefault(self.current, []).append(x.detach().float())
            if self.tau != 1.0:
                args = (x / self.tau, *args[1:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _eager_reference(model: nn.Module, names: list[str], tau: float = 1.0) -> Iterator[_Softmax4D]:
    mode = _Softmax4D(tau)
    handles = []
    for name in names:

        def pre(m: nn.Module, a: Any, name: str = name) -> None:
            mode.current = name

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        with mode, torch.no_grad():
            yield mode
    finally:
        for h in handles:
            h.remove()


def _pair(arch: Z.Arch, impl: str | None) -> tuple[nn.Module, nn.Module]:
    model = Z.build(arch, impl)  # type: ignore[arg-type]
    ref = Z.build(arch, "eager")
    ref.load_state_dict(model.state_dict())
    return model, ref


def _rows(x: Tensor, rec: Any) -> Tensor:
    """Rows ``[B', H', R, Lk]`` of a ``[B, H, Lq, Lk]`` tensor at the record's sampled items/heads/rows."""
    x = x.index_select(0, rec.batch_index).index_select(1, rec.head_index)
    return x.gather(2, rec.query_positions.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def _check_against_eager(arch: Z.Arch, model: nn.Module, ref: nn.Module, probe: AttentionProbe) -> None:
    x, mask = Z.inputs(arch, padded=True)
    with torch.no_grad(), probe.capture():
        model(**x)
    names = [r.name for r in probe.layers]
    with _eager_reference(ref, names) as seen:
        out = ref(**x, output_attentions=True)
    atts = Z.reference_attentions(arch, out)
    assert len(probe.layers) == sum(len(a) for a in atts.values())
    assert sorted((r.stack, r.index) for r in probe.layers) == sorted(
        (s, i) for s, a in atts.items() for i in range(len(a))
    )
    for rec in probe.layers:
        assert rec.theta is not None
        assert rec.max_logit is not None
        assert rec.attention == ("cross" if rec.stack == "decoder_cross" else "self")
        a = atts[rec.stack][rec.index]
        want = balanced_mass_factor(_rows(a, rec).double(), validate=False)
        finite = torch.isfinite(rec.theta.upper)
        # Every row is measured except padded queries that see no key at all (causal or local windows).
        if mask is not None and rec.stack in (None, "encoder"):
            q_pad = ~mask.bool().index_select(0, rec.batch_index)
            maybe_nan = (
                q_pad[:, None, :].expand(-1, rec.head_index.numel(), -1).gather(2, rec.query_positions)
            )
            assert bool(finite[~maybe_nan].all())
            if arch.kind == "decoder":
                assert torch.equal(~finite, maybe_nan)
        else:
            assert bool(finite.all())
        assert int(rec.n_masked_rows) == int((~finite).sum())  # type: ignore[arg-type]
        torch.testing.assert_close(rec.theta.upper[finite].double(), want.upper[finite], atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.theta.lower[finite].double(), want.lower[finite], atol=1e-5, rtol=0)
        # max_logit: the largest unmasked pre-softmax logit of the eager model (HF masks with finfo.min)
        (z,) = seen.logits[rec.name]
        z = _rows(z, rec)
        z = z.masked_fill(z <= torch.finfo(torch.float32).min / 2, float("-inf"))
        torch.testing.assert_close(rec.max_logit[finite], z.amax(-1)[finite], atol=1e-4, rtol=1e-5)
    upper = torch.cat([r.theta.upper.flatten() for r in probe.layers])
    assert float(upper[torch.isfinite(upper)].min()) < 0.9  # peaked rows are covered, not only flat ones


@pytest.mark.parametrize("impl", [None, "eager"], ids=["default", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_architecture(name: str, impl: str | None) -> None:
    """theta, max_logit and the layer count against the eager model; with the default kernel also the
    projection weights and the temperature (one model pair per case keeps the suite fast)."""
    arch = Z.ARCHS[name]
    model, ref = _pair(arch, impl)
    _check_against_eager(arch, model, ref, AttentionProbe(model, rows_per_head=5, seed=2))
    if impl is None:
        _check_projections(arch, model)
        _check_temperature(arch, model, ref, AttentionProbe(model))


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers compiles flex_attention on first use (minutes on a busy CPU); run torch's eager flex."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    wrapped = hf_flex.WrappedFlexAttention
    monkeypatch.setattr(wrapped, "_is_flex_compiled", True)
    monkeypatch.setattr(wrapped, "training", False, raising=False)
    monkeypatch.setattr(wrapped, "_compiled_flex_attention", staticmethod(flex_attention))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_decoder(eager_flex: None) -> None:
    arch = Z.ARCHS["llama"]
    model, ref = _pair(arch, "flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    _check_against_eager(arch, model, ref, AttentionProbe(model, rows_per_head=None))
    _check_temperature(arch, model, ref, AttentionProbe(model))


def _check_projections(arch: Z.Arch, model: nn.Module) -> None:
    """The weights found are the slices the model uses, and G_l is the product of their SVD norms."""
    probe = AttentionProbe(model, rows_per_head=2)
    assert arch.proj is not None
    for rec in probe.layers:
        assert rec.has_weights
        module = model.get_submodule(rec.name)
        parent = model.get_submodule(rec.name.rpartition(".")[0])
        w = rec.weights()
        expect = [Z.projection(module, parent, p) for p in arch.proj]
        for got, want in zip((w.w_q, w.w_k, w.w_v, w.w_o), expect, strict=True):
            assert torch.equal(got, want)
        kv = 4 if rec.stack is not None else arch.n_kv_heads
        assert (w.n_heads, w.n_kv_heads, w.head_dim) == (4, kv, 8)
        g_want = torch.stack([torch.linalg.svdvals(m.double())[0] for m in expect]).prod()
        g_got = torch.stack(
            [torch.linalg.matrix_norm(m.double(), ord=2) for m in (w.w_q, w.w_k, w.w_v, w.w_o)]
        )
        torch.testing.assert_close(g_got.prod(), g_want)


def _outputs(out: Any) -> list[Tensor]:
    return [t for t in (getattr(out, "last_hidden_state", None), getattr(out, "encoder_last_hidden_state",
    None))
            if isinstance(t, Tensor)]  # fmt: skip


def _check_temperature(arch: Z.Arch, model: nn.Module, ref: nn.Module, probe: AttentionProbe) -> None:
    """Outputs with ``probe.set_temperature(tau)`` equal the eager model whose softmax inputs the test divides
    by tau itself (an independent route); at tau == 1, captured or not, the output is bitwise the model's own.
    """
    x, mask = Z.inputs(arch, padded=True)
    with torch.no_grad():
        plain = _outputs(model(**x))
        with probe.capture():
            captured = _outputs(model(**x))
        probe.set_temperature(2.5)
        hot = _outputs(model(**x))
        probe.set_temperature(1.0)
        back = _outputs(model(**x))
    assert not probe.is_installed
    for a, b, c in zip(plain, captured, back, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    with _eager_reference(ref, [r.name for r in probe.layers], tau=2.5):
        want = _outputs(ref(**x))
    for got, w, p in zip(hot, want, plain, strict=True):
        if mask is not None and got.shape[1] == mask.shape[1]:  # padded tokens' outputs are arbitrary
            got, w, p = (t[mask.bool()] for t in (got, w, p))
        assert float((got - p).abs().max()) > 1e-3  # the temperature changes the output
        torch.testing.assert_close(got, w, atol=2e-4 * float(w.abs().max()), rtol=1e-4)


class _CustomKernelAttention(nn.Module):
    """nanoGPT-like attention whose kernel (standing in for a custom CUDA op) the probe cannot see; its
    forward
    names scaled_dot_product_attention only in this docstring-like comment so that the adapter matches."""

    def __init__(self, d: int = 16, n_head: int = 2) -> None:
        super().__init__()
        self.n_head, self.c_attn, self.c_proj = n_head, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        # stands in for a fused kernel replacing scaled_dot_product_attention
        b, n, d = x.shape
        q, k, v = self.c_attn(x).view(b, n, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2) / (d // self.n_head) ** 0.5).log_softmax(-1).exp()
        return self.c_proj((w @ v).transpose(1, 2).reshape(b, n, d))


def test_unobservable_kernel_gets_one_warning_with_the_remedy() -> None:
    model = nn.Sequential(_CustomKernelAttention(), _CustomKernelAttention())
    probe = AttentionProbe(model, rows_per_head=2)
    assert len(probe.layers) == 2
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with probe.capture():
                model(torch.randn(2, 5, 16))
        msgs = [str(w.message) for w in caught if "no attention kernel" in str(w.message)]
        if _ == 0:
            assert len(msgs) == 1
            assert "0 (" in msgs[0]
            assert "1 (" in msgs[0]
            assert "attn_implementation='sdpa'" in msgs[0]
            assert "register_adapter" in msgs[0]
        else:
            assert msgs == []  # said once
    assert probe.layers[0].theta is None


def test_several_kernel_calls_in_one_module_are_all_recorded() -> None:
    arch = Z.ARCHS["llama"]
    model = Z.build(arch, "sdpa")
    attn = model.layers[0].self_attn  # type: ignore[union-attr,index]
    forward: Callable[..., Any] = attn.forward

    def twice(*args: Any, **kwargs: Any) -> Any:
        forward(*args, **kwargs)
        return forward(*args, **kwargs)

    attn.forward = twice  # type: ignore[method-assign]
    probe = AttentionProbe(model, rows_per_head=3)
    x, _ = Z.inputs(arch, padded=False)
    with torch.no_grad(), probe.capture():
        model(**x)
    rec0, rec1 = probe.layers
    assert rec0.n_kernel_calls == 2
    assert rec1.n_kernel_calls == 1
    assert rec0.theta is not None
    assert rec1.theta is not None
    assert rec0.theta.upper.shape == (Z.B, 4, 6)
    assert rec1.theta.upper.shape == (Z.B, 4, 3)
    assert rec0.n_captures == 1
