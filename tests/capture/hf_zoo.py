"""Tiny Hugging Face models of many architectures (2 layers, d = 32, no downloads) and their inputs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

V, B, L = 64, 2, 8


@dataclass
class Arch:
    """How to build one architecture and where its projections live (paths relative to the probe's layer)."""

    name: str
    build: Callable[[str], nn.Module]
    kind: str  # "decoder" | "encoder" | "seq2seq" | "whisper" | "vision"
    # (q, k, v, o): attribute paths; "^x" is x in the parent module; "name[a:b]" a row slice of a fused weight
    proj: tuple[str, str, str, str] | None = None
    n_heads: int = 4
    n_kv_heads: int = 4
    gain: float = 3.0  # post-LN models need larger weights for peaked rows


def _t() -> Any:
    import transformers

    return transformers


def _dec(cfg_name: str, model_name: str, **kw: Any) -> Callable[[str], nn.Module]:
    def build(impl: str) -> nn.Module:
        t = _t()
        base: dict[str, Any] = dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=64,
            vocab_size=V,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
        base.update(kw)
        return getattr(t, model_name)(getattr(t, cfg_name)(attn_implementation=impl, **base))

    return build


def _plain(cfg_name: str, model_name: str, **kw: Any) -> Callable[[str], nn.Module]:
    def build(impl: str) -> nn.Module:
        t = _t()
        return getattr(t, model_name)(getattr(t, cfg_name)(attn_implementation=impl, **kw))

    return build


_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=V,
    max_position_embeddings=64,
)
_BART = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=V,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    decoder_start_token_id=0,
)
_SEP = ("q_proj", "k_proj", "v_proj", "o_proj")

ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch(
            "gpt2",
            _plain("GPT2Config", "GPT2Model", n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64),
            "decoder",
            ("c_attn.T[0:32]", "c_attn.T[32:64]", "c_attn.T[64:96]", "c_proj.T"),
        ),
        Arch("llama", _dec("LlamaConfig", "LlamaModel"), "decoder", _SEP, n_kv_heads=2),
        Arch(
            "mistral", _dec("MistralConfig", "MistralModel", sliding_window=4), "decoder", _SEP, n_kv_heads=2
        ),
        Arch(
            "mixtral",
            _dec("MixtralConfig", "MixtralModel", num_local_experts=2, num_experts_per_tok=1),
            "decoder",
            _SEP,
            n_kv_heads=2,
        ),
        Arch("qwen2", _dec("Qwen2Config", "Qwen2Model"), "decoder", _SEP, n_kv_heads=2),
        Arch(
            "phi3",
            _dec("Phi3Config", "Phi3Model"),
            "decoder",
            ("qkv_proj[0:32]", "qkv_proj[32:48]", "qkv_proj[48:64]", "o_proj"),
            n_kv_heads=2,
        ),
        Arch(
            "gemma2",
            _dec(
                "Gemma2Config",
                "Gemma2Model",
                head_dim=8,
                sliding_window=4,
                attn_logit_softcapping=3.0,
                query_pre_attn_scalar=8,
            ),
            "decoder",
            _SEP,
            n_kv_heads=2,
        ),
        Arch(
            "gptj",
            _plain("GPTJConfig", "GPTJModel", n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=V),
            "decoder",
            ("q_proj", "k_proj", "v_proj", "out_proj"),
        ),
        Arch(
            "bert",
            _plain("BertConfig", "BertModel", **_BERT),
            "encoder",
            ("query", "key", "value", "^output.dense"),
            gain=30.0,
        ),
        Arch(
            "roberta",
            _plain("RobertaConfig", "RobertaModel", pad_token_id=1, **_BERT),
            "encoder",
            ("query", "key", "value", "^output.dense"),
            gain=30.0,
        ),
        Arch(
            "distilbert",
            _plain(
                "DistilBertConfig",
                "DistilBertModel",
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                vocab_size=V,
            ),
            "encoder",
            ("q_lin", "k_lin", "v_lin", "out_lin"),
            gain=30.0,
        ),
        Arch(
            "bart",
            _plain("BartConfig", "BartModel", **_BART),
            "seq2seq",
            ("q_proj", "k_proj", "v_proj", "out_proj"),
        ),
        Arch(
            "t5",
            _plain(
                "T5Config",
                "T5Model",
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                vocab_size=V,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                decoder_start_token_id=0,
            ),
            "seq2seq",
            ("q", "k", "v", "o"),
        ),
        Arch(
            "whisper",
            _plain(
                "WhisperConfig",
                "WhisperModel",
                **{**_BART, "max_position_embeddings": None},
                num_mel_bins=8,
                max_source_positions=8,
                max_target_positions=16,
            ),
            "whisper",
            ("q_proj", "k_proj", "v_proj", "out_proj"),
        ),
        Arch(
            "vit",
            _plain(
                "ViTConfig",
                "ViTModel",
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=16,
                patch_size=4,
            ),
            "vision",
            _SEP,
            gain=30.0,
        ),
        # Also cheap: the families the issue names beyond the acceptance list.
        Arch(
            "gpt_neox",
            _plain(
                "GPTNeoXConfig",
                "GPTNeoXModel",
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                intermediate_size=64,
                vocab_size=V,
            ),
            "decoder",
            ("query_key_value/q", "query_key_value/k", "query_key_value/v", "dense"),
        ),
        Arch(
            "opt",
            _plain(
                "OPTConfig",
                "OPTModel",
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                ffn_dim=64,
                vocab_size=V,
                word_embed_proj_dim=32,
            ),
            "decoder",
            ("q_proj", "k_proj", "v_proj", "out_proj"),
        ),
        Arch(
            "phi",
            _dec("PhiConfig", "PhiModel", num_key_value_heads=4),
            "decoder",
            ("q_proj", "k_proj", "v_proj", "dense"),
        ),
        Arch(
            "gpt_bigcode",
            _plain(
                "GPTBigCodeConfig",
                "GPTBigCodeModel",
                n_layer=2,
                n_embd=32,
                n_head=4,
                vocab_size=V,
                multi_query=True,
            ),
            "decoder",
            ("c_attn[0:32]", "c_attn[32:40]", "c_attn[40:48]", "c_proj"),
            n_kv_heads=1,
        ),
        Arch(
            "modernbert",
            _plain(
                "ModernBertConfig",
                "ModernBertModel",
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                intermediate_size=64,
                vocab_size=V,
                global_attn_every_n_layers=2,
                local_attention=4,
                pad_token_id=0,
            ),
            "encoder",
            ("Wqkv[0:32]", "Wqkv[32:64]", "Wqkv[64:96]", "Wo"),
        ),
        Arch(
            "clip_text",
            _plain(
                "CLIPTextConfig",
                "CLIPTextModel",
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                intermediate_size=64,
                vocab_size=V,
                max_position_embeddings=64,
            ),
            "clip",
            ("q_proj", "k_proj", "v_proj", "out_proj"),
        ),
    ]
}

ACCEPTANCE = [
    "gpt2", "llama", "mistral", "mixtral", "qwen2", "phi3", "gemma2", "gptj",
    "bert", "roberta", "distilbert", "bart", "t5", "whisper", "vit",
]  # fmt: skip
EXTRA = ["gpt_neox", "opt", "phi", "gpt_bigcode", "modernbert", "clip_text"]


def build(arch: Arch, impl: str | None, seed: int = 0) -> nn.Module:
    """The model in eval mode; 2-D non-embedding weights scaled by ``gain`` (rows peaked as well as flat)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = arch.build(impl)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(arch.gain)
    return model.eval()


def inputs(arch: Arch, padded: bool) -> tuple[dict[str, Tensor], Tensor | None]:
    """Model inputs and the padding mask of the (first) token stack (``None`` where the model takes none)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if padded:
        if arch.kind == "decoder":
            mask[1, :3] = 0  # left padding
        else:
            mask[1, -3:] = 0  # right padding
    if arch.kind == "vision":
        return {"pixel_values": torch.randn(B, 3, 16, 16, generator=g)}, None
    if arch.kind == "whisper":
        dec = torch.randint(3, V, (B, 5), generator=g)
        return {"input_features": torch.randn(B, 8, 16, generator=g), "decoder_input_ids": dec}, None
    if arch.kind == "seq2seq":
        dec = torch.randint(3, V, (B, 5), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}, mask
    return {"input_ids": ids, "attention_mask": mask}, mask


def reference_attentions(arch: Arch, out: Any) -> dict[str | None, tuple[Tensor, ...]]:
    """The eager model's attention probabilities per stack."""
    if arch.kind in ("seq2seq", "whisper"):
        return {
            "encoder": out.encoder_attentions,
            "decoder": out.decoder_attentions,
            "decoder_cross": out.cross_attentions,
        }
    return {None: out.attentions}


def projection(module: nn.Module, parent: nn.Module, path: str) -> Tensor:
    """A weight in Linear layout from a path of :attr:`Arch.proj` (the test's own map of each model)."""
    src = parent if path.startswith("^") else module
    path = path.lstrip("^")
    part = None
    if "/" in path:
        path, part = path.split("/")
    rows = None
    if "[" in path:
        path, sl = path[:-1].split("[")
        a, b = sl.split(":")
        rows = slice(int(a), int(b))
    transpose = path.endswith(".T")
    path = path.removesuffix(".T")
    w = src.get_submodule(path).weight.detach()
    if transpose:
        w = w.t()
    if part is not None:  # GPT-NeoX: rows [H, 3, d] per head
        w = w.reshape(4, 3, 8, w.shape[-1])[:, "qkv".index(part)].reshape(32, -1)
    return w if rows is None else w[rows]
