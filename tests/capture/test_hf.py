"""The generic HF route on GPT-2, Llama and BERT: projections and norms, norm placement, KV-cache decoding."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from thetascope.capture import AttentionProbe
from thetascope.functional.theta import balanced_mass_factor

transformers = pytest.importorskip("transformers")

B, L, V = 2, 10, 50


def _build(family: str, impl: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "gpt2":
            cfg: Any = transformers.GPT2Config(
                n_layer=2,
                n_embd=32,
                n_head=4,
                vocab_size=V,
                bos_token_id=0,
                eos_token_id=0,
                attn_implementation=impl,
            )
            model = transformers.GPT2Model(cfg)
        elif family == "llama":
            cfg = transformers.LlamaConfig(
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=2,
                intermediate_size=64,
                vocab_size=V,
                bos_token_id=0,
                eos_token_id=0,
                attn_implementation=impl,
            )
            model = transformers.LlamaModel(cfg)
        else:
            cfg = transformers.BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=V,
                max_position_embeddings=32,
                attn_implementation=impl,
            )
            model = transformers.BertModel(cfg, add_pooling_layer=False)
    # Larger weights make peaked rows (theta far from 1) as well as balanced ones.
    gain = 30.0 if family == "bert" else 8.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(gain)
    return model.eval()


def _inputs(padding: str | None) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "right":
        mask[1, -3:] = 0
    elif padding == "left":
        mask[1, :3] = 0
    return ids, mask


def _projection_outputs(family: str, model: nn.Module) -> list[dict[str, Tensor]]:
    """Hook the model's own projections: attention input U, q/k/v pre-activation outputs, o input/output."""
    store: list[dict[str, Tensor]] = []
    handles = []
    for rec_i, layer in enumerate(_attn_modules(family, model)):
        store.append({})
        d = store[rec_i]

        def save(key: str, d: dict[str, Tensor] = d) -> Any:
            def hook(m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
                d[key + "_in"], d[key] = args[0], out

            return hook

        if family == "gpt2":
            handles += [
                layer.c_attn.register_forward_hook(save("qkv")),
                layer.c_proj.register_forward_hook(save("o")),
            ]
        elif family == "llama":
            handles += [
                getattr(layer, n).register_forward_hook(save(n[0])) for n in ("q_proj", "k_proj", "v_proj")
            ]
            handles.append(layer.o_proj.register_forward_hook(save("o")))
        else:
            handles += [
                getattr(layer.self, n).register_forward_hook(save(n[0])) for n in ("query", "key", "value")
            ]
            handles.append(layer.output.dense.register_forward_hook(save("o")))
    return store, handles  # type: ignore[return-value]


def _attn_modules(family: str, model: nn.Module) -> list[nn.Module]:
    if family == "gpt2":
        return [b.attn for b in model.h]  # type: ignore[union-attr]
    if family == "llama":
        return [b.self_attn for b in model.layers]  # type: ignore[union-attr]
    return [b.attention for b in model.encoder.layer]  # type: ignore[union-attr]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_weights_are_the_slices_the_model_uses(family: str) -> None:
    model = _build(family, "sdpa")
    ids, mask = _inputs(None)
    probe = AttentionProbe(model, rows_per_head=2)
    store, handles = _projection_outputs(family, model)
    with torch.no_grad(), probe.capture():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    for rec, d, layer in zip(probe.layers, store, _attn_modules(family, model), strict=True):
        w = rec.weights()
        assert (w.n_heads, w.head_dim) == (4, 8)
        assert w.n_kv_heads == (2 if family == "llama" else 4)
        assert rec.path_length_m == 4
        u = d["qkv_in"] if family == "gpt2" else d["q_in"]
        if family == "gpt2":
            q, k, v = d["qkv"].split(32, dim=-1)
            bq, bk, bv = layer.c_attn.bias.split(32)
        else:
            q, k, v = d["q"], d["k"], d["v"]
            mods = (
                [layer.q_proj, layer.k_proj, layer.v_proj]
                if family == "llama"
                else [layer.self.query, layer.self.key, layer.self.value]
            )
            bq, bk, bv = (m.bias if m.bias is not None else 0.0 for m in mods)
        torch.testing.assert_close(u @ w.w_q.T + bq, q, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(u @ w.w_k.T + bk, k, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(u @ w.w_v.T + bv, v, atol=1e-4, rtol=1e-5)
        bo = (
            layer.c_proj.bias
            if family == "gpt2"
            else (layer.o_proj.bias if family == "llama" else layer.output.dense.bias)
        )
        torch.testing.assert_close(
            d["o_in"] @ w.w_o.T + (0.0 if bo is None else bo), d["o"], atol=1e-4, rtol=1e-5
        )
        # attention input norm = largest token 2-norm of U
        torch.testing.assert_close(rec.attn_input_max_norm, torch.linalg.vector_norm(u, dim=-1).max())
        # per-head spectral norms against SVD of the model's own storage slices
        ph = w.per_head()
        for hh in range(4):
            if family == "gpt2":
                wq_h = layer.c_attn.weight[:, hh * 8 : (hh + 1) * 8].T
                wo_h = layer.c_proj.weight[hh * 8 : (hh + 1) * 8, :].T
            elif family == "llama":
                wq_h, wo_h = (
                    layer.q_proj.weight[hh * 8 : (hh + 1) * 8],
                    layer.o_proj.weight[:, hh * 8 : (hh + 1) * 8],
                )
            else:
                wq_h = layer.self.query.weight[hh * 8 : (hh + 1) * 8]
                wo_h = layer.output.dense.weight[:, hh * 8 : (hh + 1) * 8]
            got_q = torch.linalg.matrix_norm(ph["q"][hh], ord=2)
            got_o = torch.linalg.matrix_norm(ph["o"][hh], ord=2)
            torch.testing.assert_close(got_q, torch.linalg.svdvals(wq_h.detach())[0])
            torch.testing.assert_close(got_o, torch.linalg.svdvals(wo_h.detach())[0])
        # views, not copies
        if family != "gpt2":
            assert w.w_q.data_ptr() == rec.adapter.projection_weights().w_q.data_ptr()


@pytest.mark.parametrize(("family", "placement"), [("gpt2", "pre"), ("llama", "pre"), ("bert", "post")])
def test_norm_placement_and_residual(family: str, placement: str) -> None:
    model = _build(family, "sdpa")
    ids, mask = _inputs(None)
    probe = AttentionProbe(model, rows_per_head=2)
    blocks = model.h if family == "gpt2" else (model.layers if family == "llama" else model.encoder.layer)
    seen: list[Tensor] = []
    hs = [
        b.register_forward_pre_hook(
            lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True
        )
        for b in blocks
    ]
    with torch.no_grad(), probe.capture():
        model(ids, attention_mask=mask)
    for h in hs:
        h.remove()
    for rec, x in zip(probe.layers, seen, strict=True):
        assert rec.norm_placement == placement
        torch.testing.assert_close(rec.residual_max_norm, torch.linalg.vector_norm(x, dim=-1).max())


def test_a_kernel_registered_in_the_attention_interface_is_measured() -> None:
    """A user kernel registered with transformers' AttentionInterface receives q and k: the generic route
    reads the rows from its arguments, whatever the kernel computes."""
    model = _build("gpt2", "sdpa")
    probe = AttentionProbe(model, rows_per_head=2)
    model.config._attn_implementation = "thetascope_test_kernel"

    def custom(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Any, **kw: Any) -> Any:
        return torch.zeros_like(q).transpose(1, 2), None

    transformers.AttentionInterface.register("thetascope_test_kernel", custom)
    ids, mask = _inputs(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), probe.capture():
            model(ids, attention_mask=mask)
    assert all(r.theta is not None and r.theta.upper.shape == (B, 4, 2) for r in probe.layers)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_one_token_decoding_with_cache(impl: str) -> None:
    """Decoding with a KV cache (Lq = 1 < Lk; HF sdpa packs GQA queries then) against eager weights."""
    model = _build("llama", impl)
    ref = _build("llama", "eager")
    ref.load_state_dict(model.state_dict())
    ids, mask = _inputs("left")
    probe = AttentionProbe(model, rows_per_head=None)
    with torch.no_grad():
        past = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
        with probe.capture():
            model(ids[:, -1:], attention_mask=mask, cache=past, use_cache=True)
        rpast = ref(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
        attn = ref(ids[:, -1:], attention_mask=mask, cache=rpast, output_attentions=True).attentions
    for rec, a in zip(probe.layers, attn, strict=True):
        assert rec.theta.upper.shape == (B, 4, 1)
        want = balanced_mass_factor(a.double(), validate=False)
        torch.testing.assert_close(rec.theta.upper.double(), want.upper, atol=1e-5, rtol=0)
