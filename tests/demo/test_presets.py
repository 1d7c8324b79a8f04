"""Presets and variants are consistent with what the demo promises."""

from __future__ import annotations

import pytest
import torch

from thetascope.demo.model import GPT, GPTConfig
from thetascope.demo.train import PRESETS, VARIANTS, get_variants, lr_at


def test_gpt2_preset_has_gpt2_small_shapes() -> None:
    p = PRESETS["gpt2"]
    assert (p.n_layer, p.n_embd, p.n_head, p.block_size) == (12, 768, 12, 1024)
    # Parameter count of GPT-2 small with a 256-byte vocabulary: 85M in the blocks plus embeddings.
    with torch.device("meta"):  # shapes only, no memory
        n = sum(
            t.numel() for t in GPT(GPTConfig(n_layer=12, n_embd=768, n_head=12, block_size=1024)).parameters()
        )
    assert 85_000_000 < n < 87_000_000


def test_seven_variants_one_difference_each() -> None:
    names = [v.name for v in VARIANTS]
    assert len(names) == len(set(names)) == 7
    assert {v.norm for v in VARIANTS} == {"pre", "post"}
    assert [v.name for v in VARIANTS if v.path_length_scaling] == ["post_ln-path_length"]
    assert {v.warmup for v in VARIANTS if v.name.endswith("temp_warmup")} == {"temperature"}
    with pytest.raises(ValueError, match="unknown variant"):
        get_variants(["nope"])


def test_default_preset_is_the_cpu_budget_shape() -> None:
    p = PRESETS["default"]
    assert (p.n_layer, p.n_embd) == (12, 64)
    assert p.max_steps % p.measure_every == 0
    assert lr_at(p.warmup_steps - 1, p.lr, p.warmup_steps) == p.lr
