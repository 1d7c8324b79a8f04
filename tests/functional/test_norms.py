"""Token norms against a plain per-token loop."""

from __future__ import annotations

import math

import pytest
import torch

from thetascope.functional.norms import block_rms_norm, count_nonfinite_tokens, max_token_norm


def _reference(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max token norm, non-finite count) for x [B, L, d] and mask [B, L] by an explicit loop."""
    best = torch.zeros(x.shape[0], dtype=torch.float64)
    bad = torch.zeros(x.shape[0], dtype=torch.long)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            if not mask[b, i]:
                continue
            values = x[b, i].double().tolist()
            if not all(math.isfinite(v) for v in values):
                bad[b] += 1
                continue
            best[b] = max(best[b].item(), math.sqrt(sum(v * v for v in values)))
    return best, bad


def _random_block() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 5, generator=gen) * torch.linspace(0.1, 10, 9)[:, None]
    x[1, 8, 2] = float("nan")  # the largest token of row 1 is non-finite: skipped
    x[2, :, 0] = float("inf")  # every token of row 2 non-finite: 0
    x[3, 4, 1] = -float("inf")
    mask = torch.rand(6, 9, generator=gen) > 0.3
    mask[4] = False  # everything masked: 0
    mask[1, 8] = True
    return x, mask


def test_norms_match_reference() -> None:
    x, mask = _random_block()
    ref, bad = _reference(x, mask)
    torch.testing.assert_close(max_token_norm(x, mask).double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(block_rms_norm(x, mask).double(), ref / math.sqrt(5), rtol=1e-6, atol=0)
    assert torch.equal(count_nonfinite_tokens(x, mask), bad)
    full = torch.ones_like(mask)
    ref_full, bad_full = _reference(x, full)
    torch.testing.assert_close(max_token_norm(x).double(), ref_full, rtol=1e-6, atol=0)
    assert torch.equal(count_nonfinite_tokens(x), bad_full)
    assert max_token_norm(x, mask)[4].item() == 0.0
    assert max_token_norm(x)[2].item() == 0.0


def test_batch_dims_broadcast_mask_and_dtypes() -> None:
    x, _ = _random_block()
    x4 = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).reshape(2, 3, 9, 5)
    mask = torch.zeros(9, dtype=torch.bool)
    mask[:4] = True  # one key mask broadcast over the batch
    out = max_token_norm(x4, mask)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, torch.linalg.vector_norm(x4[..., :4, :], dim=-1).amax(-1))
    assert block_rms_norm(x4.to(torch.bfloat16)).dtype == torch.float32
    assert block_rms_norm(x4.double()).dtype == torch.float64
    # the bf16 result is the float32 result of the same (rounded) values
    xb = x4.to(torch.bfloat16)
    assert torch.equal(block_rms_norm(xb), block_rms_norm(xb.float()))


@pytest.mark.parametrize(
    ("x", "mask", "match"),
    [
        (torch.ones(5), None, "at least 2 dims"),
        (torch.ones(2, 3, dtype=torch.long), None, "floating-point"),
        (torch.ones(2, 3), torch.ones(2), "bool"),
        (torch.ones(2, 3), torch.ones(3, dtype=torch.bool), "does not broadcast"),
    ],
)
def test_bad_input(x: torch.Tensor, mask: torch.Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        block_rms_norm(x, mask)


def test_float32_tokens_whose_squares_overflow_get_their_finite_norm() -> None:
    # 3e19**2 overflows float32, the norm 5e19 does not: reduced in float64, compared with math.hypot.
    x = torch.tensor([[3e19, 4e19], [1.0, 2.0], [float("inf"), 0.0]])
    assert float(max_token_norm(x)) == pytest.approx(math.hypot(3e19, 4e19), rel=1e-6)
    assert int(count_nonfinite_tokens(x)) == 1
