"""theta: bracket, heuristic and references against brute force (Def. 4.1, Thm 4.2, Cor. 4.3)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thetascope.functional.theta import (
    ThetaBounds,
    attention_entropy,
    balanced_mass_exhaustive,
    balanced_mass_factor,
    balanced_mass_greedy,
    softmax_jacobian_norm,
)

EXACT_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def _plain_theta(p: list[float]) -> float:
    """theta by a plain Python loop over all subsets (a third, independent reference for tiny rows)."""
    total = sum(p)
    q = [v / total for v in p]
    best = 0.0
    for code in range(1 << len(q)):
        s = sum(v for i, v in enumerate(q) if code >> i & 1)
        best = max(best, 4 * s * (1 - s))
    return best


def _assert_certified(bounds: ThetaBounds, truth: torch.Tensor, probs: torch.Tensor, exact_top: int) -> None:
    """Inexact rows strictly contain the truth; rows promised exact have width 0 and match the truth."""
    lower, upper = bounds.lower.double(), bounds.upper.double()
    x = probs.double()
    support = (x > 0).sum(-1)
    pmax = (x / x.sum(-1, keepdim=True)).amax(-1)
    promised = (support <= exact_top) | (pmax >= 0.5)
    assert torch.all(bounds.width[promised] == 0)
    tol = EXACT_TOL[bounds.lower.dtype]
    exact = bounds.width == 0
    assert torch.all((lower[exact] - truth[exact]).abs() <= tol)
    assert torch.all(lower[~exact] <= truth[~exact])
    assert torch.all(truth[~exact] <= upper[~exact])
    assert torch.all((lower >= 0) & (upper <= 1) & (lower <= upper))


# --- references agree with each other ------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.25, 1.0, 3.0])
def test_theorem_4_2_jacobian_norm_equals_theta_over_tau(tau: float) -> None:
    gen = torch.Generator().manual_seed(1)
    for n_keys in range(1, 15):
        logits = torch.randn(6, n_keys, generator=gen, dtype=torch.float64) * 2.0
        p = torch.softmax(logits / tau, dim=-1)
        norm = softmax_jacobian_norm(p, tau)
        theta = balanced_mass_exhaustive(p)
        # Both sides add O(1) float64 terms, so very peaked rows (theta ~ 1e-6) carry an absolute error of a
        # few 1e-16: relative error 1e-12, or absolute 1e-14 / tau.
        assert torch.allclose(norm, theta / tau, rtol=1e-12, atol=1e-14 / tau)


def test_exhaustive_matches_plain_loop_and_handles_long_rows() -> None:
    gen = torch.Generator().manual_seed(2)
    rows = torch.rand(20, 7, generator=gen, dtype=torch.float64) ** 3
    rows[::3, 2] = 0.0
    ref = torch.tensor([_plain_theta(r.tolist()) for r in rows], dtype=torch.float64)
    assert torch.allclose(balanced_mass_exhaustive(rows), ref, rtol=0, atol=1e-14)
    # L = 22 takes the blocked path (2**22 subsets per row): 3 of 22 keys uniform gives 1 - (1/3)**2.
    row = torch.zeros(22, dtype=torch.float64)
    row[[1, 9, 20]] = 1 / 3
    assert balanced_mass_exhaustive(row).item() == pytest.approx(8 / 9, abs=1e-14)


# --- Corollary 4.3 and the paper's example --------------------------------------------------------------


@pytest.mark.parametrize("n_keys", [1, 2, 3, 4, 7, 10, 11, 14, 400, 1001])
def test_uniform_rows(n_keys: int) -> None:
    p = torch.full((n_keys,), 1.0 / n_keys, dtype=torch.float64)
    expected = 1.0 if n_keys % 2 == 0 else 1.0 - 1.0 / n_keys**2
    b = balanced_mass_factor(p)
    assert b.lower.item() <= expected + 1e-12
    assert expected - 1e-12 <= b.upper.item()
    assert b.width.item() <= 1.0 / n_keys**2 + 1e-12  # at most ~ (m-th largest entry)**2
    if n_keys <= 14:
        assert balanced_mass_exhaustive(p).item() == pytest.approx(expected, abs=1e-13)


@pytest.mark.parametrize("n_keys", [1, 5, 300])
def test_one_hot_rows(n_keys: int) -> None:
    p = torch.zeros(n_keys)
    p[n_keys // 2] = 1.0
    b = balanced_mass_factor(p)
    assert b.lower.item() == 0.0
    assert b.upper.item() == 0.0
    if n_keys <= 14:
        assert balanced_mass_exhaustive(p).item() == 0.0


@pytest.mark.parametrize("kappa", [0.01, 0.2, 0.45, 0.5])
def test_peaked_rows(kappa: float) -> None:
    gen = torch.Generator().manual_seed(3)
    for n_keys in (3, 12, 200):
        rest = torch.rand(n_keys - 1, generator=gen, dtype=torch.float64)
        p = torch.cat([torch.tensor([1 - kappa], dtype=torch.float64), kappa * rest / rest.sum()])
        bound = 4 * kappa * (1 - kappa)
        b = balanced_mass_factor(p)
        assert b.upper.item() <= bound + 1e-12
        assert b.width.item() == 0.0  # p_max >= 1/2: exact
        if n_keys <= 14:
            assert balanced_mass_exhaustive(p).item() <= bound + 1e-12


@pytest.mark.parametrize("k", range(1, 14))
def test_top_k_uniform_rows(k: int) -> None:
    expected = 1 - (1 - 2 * (k // 2) / k) ** 2
    short = torch.zeros(15, dtype=torch.float64)
    short[torch.randperm(15, generator=torch.Generator().manual_seed(k))[:k]] = 1.0 / k
    assert balanced_mass_exhaustive(short).item() == pytest.approx(expected, abs=1e-13)
    long = torch.zeros(3, 64, dtype=torch.float64)
    long[:, 5 : 5 + k] = 1.0 / k
    b = balanced_mass_factor(long)
    assert torch.all(b.lower <= expected + 1e-12)
    assert torch.all(b.upper >= expected - 1e-12)
    if k <= 10:
        assert torch.all(b.width == 0)


def test_paper_example_greedy_is_wrong() -> None:
    p = torch.tensor([0.4, 0.1, 0.4, 0.1])
    assert balanced_mass_exhaustive(p).item() == pytest.approx(1.0, abs=1e-15)
    b = balanced_mass_factor(p)
    assert b.lower.item() == 1.0
    assert b.upper.item() == 1.0
    assert balanced_mass_greedy(p).item() == pytest.approx(0.96, abs=1e-6)


# --- the bracket on many random rows --------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _random_softmax_rows(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows [4, n, L], brute-force theta [4, n]) for L = 2..18; logits N(0, s^2), s in {0.5, 1, 3, 6}.

    Fewer rows at the longest lengths, where the brute-force reference costs 2**L per row; 5,952 rows in all.
    """
    gen = torch.Generator().manual_seed(4)
    out = []
    for n_keys in range(2, 19):
        n = 120 if n_keys <= 12 else 40 if n_keys <= 15 else 16
        logits = torch.randn(4, n, n_keys, generator=gen, dtype=torch.float64)
        logits *= torch.tensor([0.5, 1.0, 3.0, 6.0], dtype=torch.float64)[:, None, None]
        p = torch.softmax(logits, dim=-1).to(dtype)
        out.append((p, balanced_mass_exhaustive(p)))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("exact_top", [4, 10])
def test_bracket_contains_exhaustive_on_random_softmax_rows(dtype: torch.dtype, exact_top: int) -> None:
    n_rows = 0
    n_inexact = 0
    greedy_wrong = 0
    for p, truth in _random_softmax_rows(dtype):
        b = balanced_mass_factor(p, exact_top=exact_top)
        assert b.lower.dtype == dtype
        assert b.lower.shape == truth.shape
        _assert_certified(b, truth, p, exact_top)
        greedy = balanced_mass_greedy(p).double()
        assert torch.all(greedy <= truth + EXACT_TOL[dtype])  # the heuristic is a real subset
        greedy_wrong += int((greedy < truth - 1e-6).sum())
        n_rows += truth.numel()
        n_inexact += int((b.width > 0).sum())
    assert n_rows >= 5000
    assert n_inexact > (2000 if exact_top == 4 else 500)  # the inexact branch was exercised
    assert greedy_wrong > 1000  # and the heuristic is often wrong on the same rows


def test_lighter_half_floor_holds() -> None:
    # The bracket uses 1 - p_max**2 as a floor (greedy "lighter half" argument): check it against brute force.
    n_checked = 0
    for p, truth in _random_softmax_rows(torch.float64):
        pmax = p.amax(-1)
        assert torch.all(truth >= 1 - pmax.square() - 1e-12)
        n_checked += int((pmax < 0.5).sum())
    assert n_checked > 2000


def test_many_rows_are_processed_in_blocks() -> None:
    # exact_top=16 makes blocks of 64 rows; the result must not depend on the blocking.
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(100, 17, generator=gen, dtype=torch.float64) * 2, dim=-1)
    whole = balanced_mass_factor(p, exact_top=16)
    parts = [balanced_mass_factor(p[i : i + 30], exact_top=16) for i in range(0, 100, 30)]
    assert torch.equal(whole.lower, torch.cat([q.lower for q in parts]))
    assert torch.equal(whole.upper, torch.cat([q.upper for q in parts]))
    _assert_certified(whole, balanced_mass_exhaustive(p), p, 16)


def test_reused_work_memory_leaves_no_trace_between_calls_or_threads() -> None:
    # On CPU the bracket's work arrays are kept per thread and reused: results of one call must not alias
    # them, and calls of other sizes, dtypes or threads in between must not change any result.
    import threading

    gen = torch.Generator().manual_seed(11)
    inputs = [
        torch.softmax(torch.randn(n, k, generator=gen, dtype=dtype) * 3, dim=-1)
        for n, k, dtype in ((300, 40, torch.float32), (70, 12, torch.float64), (500, 9, torch.float32))
    ]
    alone = [balanced_mass_factor(p) for p in inputs]
    copies = [(b.lower.clone(), b.upper.clone()) for b in alone]
    results: dict[int, list[ThetaBounds]] = {}

    def work(i: int) -> None:
        results[i] = [balanced_mass_factor(p) for p in inputs[i:] + inputs[:i]]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b, (lower, upper) in zip(alone, copies):
        assert torch.equal(b.lower, lower)
        assert torch.equal(b.upper, upper)
    for i, got in results.items():
        for b, (lower, upper) in zip(got, copies[i:] + copies[:i]):
            assert torch.equal(b.lower, lower)
            assert torch.equal(b.upper, upper)
    for p, b in zip(inputs[1:2], alone[1:2]):  # short rows: also against the truth
        _assert_certified(b, balanced_mass_exhaustive(p), p, 10)


def test_work_memory_survives_inference_mode_in_either_order() -> None:
    # Lightning validates under torch.inference_mode: work arrays first made there must still be writable in a
    # training step afterwards, and the other way round.
    import thetascope.functional.theta as theta_module

    p = torch.softmax(torch.randn(64, 40, generator=torch.Generator().manual_seed(2)), dim=-1)
    theta_module._SCRATCH.arrays.clear()
    with torch.inference_mode():
        first = balanced_mass_factor(p)
    outside = balanced_mass_factor(p)
    with torch.inference_mode():
        again = balanced_mass_factor(p)
    for b in (outside, again):
        assert torch.equal(b.lower, first.lower)
        assert torch.equal(b.upper, first.upper)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_width_stays_below_the_square_of_the_largest_tail_entry(scale: float) -> None:
    # The documented guarantee, from the row alone: with q the (m+1)-th largest entry (the largest one left
    # to the staircase), upper - lower <= q**2, up to the float32 rounding allowance. It holds with only the
    # best subset of the top entries searched, so it must hold with its neighbours too (512 > 64 subsets).
    gen = torch.Generator().manual_seed(11)
    logits = scale * torch.randn(4096, 128, generator=gen)
    support = torch.randint(12, 129, (4096, 1), generator=gen)
    p = torch.softmax(logits.masked_fill(torch.arange(128) >= support, float("-inf")), dim=-1)
    b = balanced_mass_factor(p, exact_top=10)
    q = p.double().sort(dim=-1, descending=True).values[:, 10]
    # widening by tol = 2 (L + m + 4) eps on each side of a delta <= 1/2 moves theta by at most 8 tol
    allowance = 8 * 2 * (128 + 10 + 4) * torch.finfo(torch.float32).eps + 2.0**-22
    assert torch.all(b.width.double() <= q.square() + allowance)
    assert float(b.width.median()) <= 1e-5  # and typical rows are far tighter than the guarantee


def test_long_rows_are_tight() -> None:
    gen = torch.Generator().manual_seed(6)
    p = torch.softmax(torch.randn(64, 1024, generator=gen), dim=-1)
    b = balanced_mass_factor(p)
    assert torch.all(b.width <= 1e-6)
    assert torch.all(balanced_mass_greedy(p) <= b.upper)


_ENTRY = st.one_of(
    st.sampled_from([0.0, 0.0, 1e-12, 1e-7, 0.25, 1.0, 1.0, 3.0]),
    st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=150, deadline=None)
@given(
    entries=st.lists(_ENTRY, min_size=1, max_size=13).filter(lambda v: sum(v) > 1e-6),
    exact_top=st.integers(min_value=1, max_value=12),
    scale=st.sampled_from([0.001, 0.5, 7.0, 1e4]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_property_bracket_certified_and_invariant(
    entries: list[float], exact_top: int, scale: float, seed: int
) -> None:
    raw = torch.tensor(entries, dtype=torch.float64)
    p = raw / raw.sum()
    truth = balanced_mass_exhaustive(p)
    b = balanced_mass_factor(p, exact_top=exact_top)
    _assert_certified(b, truth, p, exact_top)
    perm = torch.randperm(p.numel(), generator=torch.Generator().manual_seed(seed))
    for other in (p[perm], p * scale):
        b2 = balanced_mass_factor(other, exact_top=exact_top, validate=False)
        _assert_certified(b2, truth, other, exact_top)
    # float32 copy: certified against the truth of its own (rounded) values
    p32 = p.float()
    _assert_certified(
        balanced_mass_factor(p32, exact_top=exact_top), balanced_mass_exhaustive(p32), p32, exact_top
    )


# --- shapes, dtypes, devices, bad input ------------------------------------------------------------------


def test_shapes_dtypes_and_short_rows() -> None:
    p = torch.softmax(torch.randn(2, 3, 5, 6), dim=-1)
    b = balanced_mass_factor(p, exact_top=10)  # L < exact_top: exact
    assert b.lower.shape == (2, 3, 5)
    assert b.lower.dtype == torch.float32
    assert torch.equal(b.lower, b.upper)
    flat = balanced_mass_factor(p.reshape(-1, 6), exact_top=10)
    assert torch.equal(flat.lower, b.lower.reshape(-1))
    assert torch.allclose(b.lower.double(), balanced_mass_exhaustive(p), atol=1e-6, rtol=0)
    single = balanced_mass_factor(torch.tensor([1.0]))
    assert single.lower.shape == ()
    assert single.upper.item() == 0.0
    assert balanced_mass_factor(p.double()).lower.dtype == torch.float64
    assert balanced_mass_greedy(p).shape == (2, 3, 5)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_input_matches_its_float32_copy(half: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(32, 300, generator=gen) * 2, dim=-1).to(half)
    b_half = balanced_mass_factor(p)
    b_32 = balanced_mass_factor(p.float(), validate=False)  # bf16 rows may miss the fp32 sum tolerance
    assert b_half.lower.dtype == torch.float32
    assert torch.equal(b_half.lower, b_32.lower)
    assert torch.equal(b_half.upper, b_32.upper)
    assert torch.equal(balanced_mass_greedy(p), balanced_mass_greedy(p.float()))


@pytest.mark.parametrize("validate", [True, False])
def test_non_finite_rows_give_nan_only_there(validate: bool) -> None:
    p = torch.softmax(torch.randn(5, 20), dim=-1)
    p[1, 3] = float("nan")
    p[2, 0] = float("inf")
    p[3, 5] = -float("inf")
    b = balanced_mass_factor(p, validate=validate)
    assert torch.isnan(b.lower[1:4]).all()
    assert torch.isnan(b.upper[1:4]).all()
    assert torch.isfinite(b.lower[[0, 4]]).all()
    assert torch.isfinite(b.upper[[0, 4]]).all()
    assert torch.isnan(balanced_mass_exhaustive(p[:, :12])[1:4]).all()
    assert torch.isnan(balanced_mass_greedy(p)[1]).item()


@pytest.mark.parametrize("n_keys", [8, 128])
def test_bad_rows_leave_the_other_rows_bitwise_alone(n_keys: int) -> None:
    # Bad rows are not cleaned before the bracket: whatever they hold (NaN, +-inf, zeros, NaN bit patterns
    # of either sign) must neither reach the good rows nor form an index out of range.
    torch.manual_seed(3)
    good = torch.softmax(3 * torch.randn(6, n_keys), dim=-1)
    bad = torch.rand(6, n_keys)
    bad[0, 1] = float("nan")
    bad[1] = float("nan")
    bad[2, 0] = float("inf")
    bad[3] = 0.0
    bad[4, :] = float("inf")
    bad[5] = -torch.tensor(float("nan"))  # the sign bit set: a negative integer to topk's comparison
    rows = torch.stack([good, bad], dim=1).reshape(12, n_keys)  # good and bad rows alternate
    mixed = balanced_mass_factor(rows, validate=False)
    alone = balanced_mass_factor(good, validate=False)
    assert torch.equal(mixed.lower[0::2], alone.lower)
    assert torch.equal(mixed.upper[0::2], alone.upper)
    assert torch.isnan(mixed.lower[1::2]).all()
    assert torch.isnan(mixed.upper[1::2]).all()


def test_zero_row_without_validation_is_nan() -> None:
    p = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    b = balanced_mass_factor(p, validate=False)
    assert math.isnan(b.lower[0].item())
    assert b.lower[1].item() == 1.0


@pytest.mark.parametrize(
    ("probs", "kwargs", "match"),
    [
        (torch.tensor(1.0), {}, "at least one dimension"),
        (torch.empty(3, 0), {}, "empty last dimension"),
        (torch.tensor([[0.5, 0.5], [1.2, -0.2]]), {}, "negative entry"),
        (torch.tensor([[0.5, 0.5], [0.5, 0.6]]), {}, r"row \(1,\) sums to 1.1"),
        (torch.tensor([0.5, 0.502]), {}, "sums to"),  # fp32 tolerance is 1e-3
        (torch.tensor([1, 0]), {}, "floating-point"),
        (torch.tensor([0.5, 0.5]), {"exact_top": 0}, "exact_top"),
        (torch.tensor([0.5, 0.5]), {"exact_top": 21}, "exact_top"),
    ],
)
def test_bad_input_is_rejected(probs: torch.Tensor, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        balanced_mass_factor(probs, **kwargs)


def test_tolerances_depend_on_dtype() -> None:
    balanced_mass_factor(torch.tensor([0.5, 0.5004]))  # within fp32 tolerance
    balanced_mass_factor(torch.tensor([0.5, 0.51], dtype=torch.bfloat16))  # within half tolerance
    balanced_mass_factor(torch.tensor([0.5, 0.5, -1e-9]))  # rounding-size negative entry
    with pytest.raises(ValueError, match="sums to"):
        balanced_mass_factor(torch.tensor([0.5, 0.5001], dtype=torch.float64))
    # validate=False skips the checks
    assert balanced_mass_factor(torch.tensor([0.5, 0.6]), validate=False).lower.isfinite()


def test_reference_limits_and_tau() -> None:
    with pytest.raises(ValueError, match="L <= 24"):
        balanced_mass_exhaustive(torch.full((25,), 1 / 25))
    with pytest.raises(ValueError, match="L <= 20"):
        softmax_jacobian_norm(torch.full((21,), 1 / 21))
    with pytest.raises(ValueError, match="tau"):
        softmax_jacobian_norm(torch.full((3,), 1 / 3), tau=0.0)


def test_attention_entropy_against_reference() -> None:
    gen = torch.Generator().manual_seed(8)
    p = torch.softmax(torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3, dim=-1)
    p[0, :3] = 0.0
    ref = torch.tensor(
        [-sum(v * math.log(v) for v in row.tolist() if v > 0) for row in p], dtype=torch.float64
    )
    assert torch.allclose(attention_entropy(p), ref, atol=1e-14, rtol=0)
    assert attention_entropy(torch.full((2, 16), 1 / 16)).allclose(torch.full((2,), math.log(16)))
    assert attention_entropy(torch.tensor([0.0, 1.0, 0.0])).item() == 0.0
    assert attention_entropy(p.to(torch.bfloat16)).dtype == torch.float32


def test_thetabounds_properties() -> None:
    b = ThetaBounds(torch.tensor([0.5, 1.0]), torch.tensor([0.7, 1.0]))
    assert torch.allclose(b.width, torch.tensor([0.2, 0.0]))
    assert torch.allclose(b.mid, torch.tensor([0.6, 1.0]))
    lower, upper = b
    assert lower is b.lower
    assert upper is b.upper


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(9)
    p = torch.softmax(torch.randn(4, 64, 300, generator=gen) * 3, dim=-1)
    p[0, 0, 0] = float("nan")
    cpu = balanced_mass_factor(p)
    gpu = balanced_mass_factor(p.cuda())
    assert gpu.lower.device.type == "cuda"
    torch.testing.assert_close(gpu.lower.cpu(), cpu.lower, atol=1e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(gpu.upper.cpu(), cpu.upper, atol=1e-6, rtol=0, equal_nan=True)
    short = torch.softmax(torch.randn(50, 12, generator=gen, dtype=torch.float64), dim=-1)
    _assert_certified(
        balanced_mass_factor(short.cuda()), balanced_mass_exhaustive(short).cuda(), short.cuda(), 10
    )
