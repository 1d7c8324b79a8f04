"""The balanced-mass factor theta(p) of an attention row, with a certificate.

``theta(p) = 4 * max_S p(S) * (1 - p(S)) = 1 - 4 * delta**2`` where ``delta = min_S |p(S) - 1/2|`` over all
subsets ``S`` of the keys. By Theorem 4.2 of the paper, ``theta(p) / tau`` is exactly the l_inf -> l_1 norm of
the softmax Jacobian. Computing ``delta`` is a subset-sum (number-partition) problem, so this module reports a
bracket ``[lower, upper]`` that provably contains the true value (exact whenever the row allows it), the
paper's sorted-prefix heuristic for comparison, and brute-force references for tests.

Every function here normalises each row by its own sum first, so the value reported is theta of
``p / sum(p)``.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
from torch import Tensor

from thetascope.functional._ranges import cached_arange, cached_scalar

__all__ = [
    "MAX_EXACT_TOP",
    "MAX_EXHAUSTIVE_LENGTH",
    "MAX_JACOBIAN_LENGTH",
    "ThetaBounds",
    "attention_entropy",
    "balanced_mass_exhaustive",
    "balanced_mass_factor",
    "balanced_mass_greedy",
    "softmax_jacobian_norm",
]

#: Largest ``exact_top`` accepted by :func:`balanced_mass_factor` (it enumerates ``2**(exact_top - 1)``
#: masks).
MAX_EXACT_TOP = 20
#: Largest row length accepted by :func:`balanced_mass_exhaustive` (``2**24`` subsets per row).
MAX_EXHAUSTIVE_LENGTH = 24
#: Largest row length accepted by :func:`softmax_jacobian_norm` (``2**20`` sign vectors per row).
MAX_JACOBIAN_LENGTH = 20

# Tolerances of the input checks, by input dtype: a finite row must sum to 1 within ``sum``, and no entry may
# be below ``-neg``. Half-precision softmax rows carry a relative rounding error of ~2**-9 per entry, hence
# the looser values there.
_SUM_TOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}
_NEG_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}

# Elements (rows x masks) handled at once by the bracket and by the brute-force references; bounds peak memory
# to a few hundred MB of float64 temporaries.
_BLOCK_ELEMENTS = 1 << 21
# The bracket's block on accelerators: each block is a few dozen kernel launches, so one block holds a whole
# layer's sampled rows there (GPT-2 774M, B=4, 64 rows per head: 5,120 rows x 512 subsets); about 200 MB of
# transient float32 work arrays at most.
_DEVICE_BLOCK_ELEMENTS = 1 << 23

_MASKS: dict[tuple[int, str, torch.dtype], Tensor] = {}
_FLIPS: dict[tuple[int, str], Tensor] = {}
# Up to this many subsets of the top entries, every one of them is searched against the tail's staircase;
# beyond it only the best subset and those within two flipped items of it (see _near_best).
_SEARCH_ALL = 64


class ThetaBounds(NamedTuple):
    """A certified bracket ``lower <= theta <= upper`` (same shape, one value per row).

    Example:
        >>> b = ThetaBounds(torch.tensor([0.9]), torch.tensor([1.0]))
        >>> b.width, b.mid
        (tensor([0.1000]), tensor([0.9500]))
    """

    lower: Tensor
    upper: Tensor

    @property
    def width(self) -> Tensor:
        """``upper - lower`` (0 where the value is exact, NaN for invalid rows)."""
        return self.upper - self.lower

    @property
    def mid(self) -> Tensor:
        """The bracket's midpoint, a point estimate within ``width / 2`` of the true value."""
        return 0.5 * (self.lower + self.upper)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"probs must be a floating-point tensor, got dtype {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shape(probs: Tensor, name: str = "probs") -> None:
    if probs.ndim == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the last one holds each row), got a 0-dim tensor"
        )
    if probs.shape[-1] == 0:
        raise ValueError(
            f"{name} has an empty last dimension (shape {tuple(probs.shape)}); rows need >= 1 entry"
        )


def _validate_rows(probs: Tensor) -> None:
    """Raise ``ValueError`` for negative entries or finite rows that do not sum to 1 (one host sync)."""
    sum_tol = _SUM_TOL.get(probs.dtype, 1e-3)
    neg_tol = _NEG_TOL.get(probs.dtype, 1e-6)
    x = probs.detach()
    finite = torch.isfinite(x).all(dim=-1)
    work = x if x.dtype == torch.float64 else x.float()
    negative = ((work < -neg_tol).any(dim=-1)) & finite
    off = (work.sum(dim=-1) - 1.0).abs()
    off_sum = (off > sum_tol) & finite
    flags = torch.stack([negative.any(), off_sum.any()]).tolist()  # the single host sync
    if flags[0]:
        bad = negative.nonzero()[0].tolist()
        vmin = float(work[tuple(bad)].min())
        raise ValueError(
            f"probs has a negative entry {vmin:.3g} (tolerance -{neg_tol:g} for {probs.dtype}) "
            f"in row {tuple(bad)}"
        )
    if flags[1]:
        bad = off_sum.nonzero()[0].tolist()
        total = float(work[tuple(bad)].sum())
        raise ValueError(
            f"probs row {tuple(bad)} sums to {total:.6g}, not 1 (tolerance {sum_tol:g} for {probs.dtype}); "
            "pass probability rows (e.g. a softmax output), or validate=False to skip this check"
        )


def _normalised_rows(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten to ``[N, L]`` float64 rows divided by their sums; non-finite or zero-sum rows become 0.

    Returns ``(rows, ok)`` with ``ok`` a bool ``[N]`` marking the rows that were valid.
    """
    x = probs.detach().reshape(-1, probs.shape[-1]).to(torch.float64, copy=True)
    finite = torch.isfinite(x.sum(dim=-1))  # a NaN or +-inf entry makes the raw sum non-finite
    total = x.clamp_min_(0.0).sum(dim=-1, keepdim=True)  # tiny negative rounding noise -> 0
    ok = finite & (total.squeeze(-1) > 0)
    x.div_(total).masked_fill_(~ok.unsqueeze(-1), 0.0)
    return x, ok


def _half_masks(m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Cached ``[m, 2**(m - 1)]`` matrix ``M`` such that ``[b, top[1:]] @ M`` gives ``b - s`` for every mask.

    Row 0 is all ones (it carries a per-row bias ``b``); below it, ``-mask`` with ``mask`` the 0/1 matrix
    ``[m - 1, 2**(m - 1)]`` whose column ``j`` selects items 1..m-1 by the bits of ``j``. Item 0 (the
    largest) is never selected: a subset and its complement have the same ``|p(S) - 1/2|``, so the subsets
    without item 0 already reach the minimum.
    """
    key = (m, str(device), dtype)
    cached = _MASKS.get(key)
    if cached is None:
        n = m - 1
        codes = torch.arange(1 << n, device=device)
        bits = torch.arange(n, device=device)
        mask = -((codes.unsqueeze(0) >> bits.unsqueeze(1)) & 1).to(dtype)
        cached = torch.cat([torch.ones(1, 1 << n, dtype=dtype, device=device), mask]).contiguous()
        _MASKS[key] = cached
    return cached


class _Scratch(threading.local):
    """Per-thread flat work arrays of the bracket, by (slot, dtype); see :func:`_scratch`."""

    def __init__(self) -> None:
        self.arrays: dict[tuple[int, torch.dtype], Tensor] = {}


_SCRATCH = _Scratch()


def _scratch(slot: int, n_rows: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``[n_rows, width]`` work array; on CPU, the same memory on every call of this thread.

    The bracket's ``[N, 2**(m-1)]`` and ``[N, L]`` temporaries are MBs: freshly allocated on CPU, they cost
    more to fault in than the kernels that fill them (1.3 ms of 5.5 ms on 2048 rows of 128 keys, m = 10).
    Arrays above ``_BLOCK_ELEMENTS`` are not kept, so each of the eight slots holds at most 8 MB (16 MB in
    float64) per thread. Other devices have a caching allocator.
    """
    need = n_rows * width
    if device.type != "cpu" or need > _BLOCK_ELEMENTS:
        return torch.empty(n_rows, width, dtype=dtype, device=device)
    flat = _SCRATCH.arrays.get((slot, dtype))
    if flat is None or flat.numel() < need:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            flat = torch.empty(need, dtype=dtype)
        _SCRATCH.arrays[(slot, dtype)] = flat
    return flat[:need].view(n_rows, width)


def _argmin_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x.min(dim=-1)`` of ``[N, K]`` with ``K`` a power of two, as one ``amin`` and two small searches.

    ``min`` with indices over a long last dimension is several times slower than ``amin`` on CPU; the index
    is looked for only within the 64-wide group that holds the minimum.
    """
    n_rows, k = x.shape
    width = min(k, 64)
    n_groups = k // width
    value, g = x.view(n_rows, n_groups, width).amin(dim=-1).min(dim=-1)  # over [N, K / width]
    # that group of each row, as rows of the [N * K / width, width] view: index_select copies whole rows
    # (faster on CPU than a gather, 0.56x the time on 2048 x 512)
    flat = torch.add(g, cached_arange(n_rows, x.device), alpha=n_groups)
    inner = x.view(n_rows * n_groups, width).index_select(0, flat).argmin(dim=-1)
    return value, torch.add(inner, g, alpha=width)


def _near_best(m: int, device: torch.device) -> Tensor:
    """Cached XOR patterns ``[K]`` flipping at most two of the ``m - 1`` mask bits (no flip first).

    ``best ^ flips`` are the subsets of the top entries that differ from the best one by at most two items.
    """
    key = (m, str(device))
    cached = _FLIPS.get(key)
    if cached is None:
        bits = [1 << i for i in range(m - 1)]
        pairs = [a | b for i, a in enumerate(bits) for b in bits[i + 1 :]]
        cached = torch.tensor([0, *bits, *pairs], dtype=torch.int64, device=device)
        _FLIPS[key] = cached
    return cached


def _bracket_inputs(probs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(rows, raw, total64, ok)`` for the bracket: ``[N, L]`` rows divided by their sums in the work dtype.

    The work dtype is float64 for float64 input and float32 otherwise (half types convert exactly). ``raw``
    are the clamped input values, ``total64`` their sums in float64 (for the exact rows) and ``ok`` marks
    finite rows of positive sum; the values of other rows are garbage, to be discarded.
    """
    work = torch.float64 if probs.dtype == torch.float64 else torch.float32
    x = probs.detach().reshape(-1, probs.shape[-1])
    # A NaN or +-inf entry makes the sum NaN or infinite, which is exactly when |sum| < inf fails (two ops
    # where isfinite takes four).
    finite = x.sum(dim=-1, dtype=work).abs_() < torch.inf
    n_rows, n_keys = x.shape
    # clamped into a work array of our own, which the bracket may overwrite (tiny negative noise -> 0)
    raw = _scratch(4, n_rows, n_keys, work, x.device)
    raw = torch.clamp_min(x, 0.0, out=raw) if x.dtype == work else raw.copy_(x).clamp_min_(0.0)
    if x.device.type == "cpu" and work != torch.float64:
        # a float64 sum on CPU first converts every entry into a temporary: into a kept one here, which saves
        # faulting in fresh pages on every call (CUDA converts inside the reduction)
        total64 = _scratch(5, n_rows, n_keys, torch.float64, x.device).copy_(raw).sum(dim=-1)
    else:
        total64 = raw.sum(dim=-1, dtype=torch.float64)
    ok = finite & (total64 > 0)
    # Rows that are not ok are left as they are: every op below works row by row and every index it forms
    # stays in range whatever a row holds (NaN included), and their values are replaced by NaN at the end.
    # divided by the float64 sum rounded once to the work dtype: no second pass over the rows
    scale = total64.to(work).clamp_min_(torch.finfo(work).tiny).unsqueeze(-1)
    rows = torch.div(raw, scale, out=_scratch(6, n_rows, n_keys, work, x.device))
    return rows, raw, total64, ok


def _bracket_block(rows: Tensor, raw: Tensor, total64: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Certified delta bounds ``(high, low) [N]`` (float64) and ``exact [N]`` for rows ``[N, L]`` of sum 1.

    ``rows`` is float32 or float64 (the work dtype); the ``[N, 2**(m-1)]`` part runs in it and its rounding is
    absorbed by widening inexact brackets (see the bound below). All-zero rows are allowed (their result is
    discarded). ``rows`` is overwritten (top-m entries zeroed).
    """
    n_rows, n_keys = rows.shape
    work = rows.dtype
    # Sorted descending. The rows are finite and >= 0 (or -0.0, which then sorts last: still a zero), and such
    # floats order exactly as their bit patterns read as integers: topk's integer comparisons skip the NaN
    # handling of the float ones (0.87x the time on 2048 x 128 rows). Sorted matters: with the largest entry
    # left out of the masks, the subsets near the best one (searched below) bracket 3x tighter than with an
    # arbitrary one left out.
    as_int = torch.int64 if work == torch.float64 else torch.int32
    top, idx = torch.topk(rows.view(as_int), m, dim=-1)
    top = top.view(work)
    # the top entries again in float64, from the raw values: the exact rows' arithmetic
    top64 = (
        raw.gather(-1, idx)
        .to(torch.float64)
        .div_(total64.clamp_min(torch.finfo(torch.float64).tiny)[:, None])
    )
    pmax64 = top64[:, 0]
    # The tail in index order; its prefix sums are a staircase 0 = c_0 <= ... <= c_L = T with steps at most
    # the m-th largest entry. (The zeros are an expanded 0-dim tensor: on CPU half the time of scatter_'s
    # scalar overload.)
    tail = rows.scatter_(-1, idx, cached_scalar(0.0, work, rows.device).expand(idx.shape))
    cums = torch.cumsum(tail, dim=-1, out=_scratch(7, n_rows, n_keys, work, rows.device))
    tail_mass = cums[:, -1]
    half_t = 0.5 * tail_mass
    # t' = 1/2 - T/2 - s for the subset sums s of the top m (item 0 excluded, see _half_masks): one matmul
    # with the per-row bias in place of item 0 (no longer needed in the work dtype), so both bounds below are
    # distances of t' to something, with no further subtraction.
    top[:, 0] = 0.5 - half_t
    target = _scratch(0, n_rows, 1 << (m - 1), work, rows.device)  # [N, 2**(m-1)]
    torch.matmul(top, _half_masks(m, rows.device, work), out=target)
    # Upper bound on theta: at best the tail adds any amount in [0, T], and dist(1/2, [s, s + T]) =
    # max(|t'| - T/2, 0). The argmin is the best subset of the top m, used by the exact rows.
    magnitude = torch.abs(target, out=_scratch(1, n_rows, target.shape[1], work, rows.device))
    dist, best = _argmin_rows(magnitude)
    delta_low = (dist - half_t).clamp_min_(0.0)
    # Lower bound on theta: the stair nearest to t' (stairs shifted by -T/2 like t') completes a real subset.
    # Searching the midpoints between stairs finds it in one search and one gather; a midpoint off by
    # rounding can only pick the second-nearest stair, still a real subset (covered by the tolerance).
    # Beyond _SEARCH_ALL subsets only those within two items of the best one are searched (46 of 512 for
    # m = 10): the best one alone already keeps the width below the square of the largest tail entry, and
    # on causal softmax rows (L = 128 and 1024, logit scales 0.5-8) its neighbours kept the largest width at
    # 1.6e-4 (1.2e-4 searching all) and the 99th percentile below 1.3e-5, for a seventh of the search time.
    if target.shape[1] > _SEARCH_ALL:
        target = target.gather(-1, best.unsqueeze(-1) ^ _near_best(m, rows.device))
    stairs = _scratch(2, n_rows, n_keys + 3, work, rows.device)
    stairs[:, 0] = -4.0  # sentinels: every t' in [-1, 1] lies strictly inside
    stairs[:, 1] = -half_t
    stairs[:, -1] = 4.0
    torch.sub(cums, half_t.unsqueeze(-1), out=stairs[:, 2:-1])
    mids = torch.add(stairs[:, 1:], stairs[:, :-1], out=_scratch(3, n_rows, n_keys + 2, work, rows.device))
    mids.mul_(0.5)  # [N, L + 2]
    j = torch.searchsorted(mids, target)  # mids[j - 1] < t' <= mids[j]: stairs[j] is the nearest
    err = stairs.gather(-1, j).sub_(target).abs_().amin(dim=-1)
    # Floor: putting items one by one into the lighter half leaves halves within p_max of each other.
    delta_high = torch.minimum(err.to(torch.float64), 0.5 * pmax64)
    peaked = pmax64 >= 0.5
    exact = peaked | (tail_mass == 0)
    # Exact rows in float64: the peak, or the best subset of the top m (found above) summed again in float64.
    # In float32 a different subset could only beat it by less than the tolerance below.
    bits = ((best.unsqueeze(-1) >> torch.arange(m - 1, device=rows.device)) & 1).to(torch.float64)
    subset64 = (top64[:, 1:] * bits).sum(-1)
    delta_exact = torch.where(peaked, pmax64 - 0.5, (0.5 - subset64).abs())
    # Rounding in the work dtype (unit roundoff u = eps / 2): the normalisation (by the float64 sum, rounded
    # once) moves every subset sum by at most 2 u, the addmm (m terms and the bias) by (m + 2) u, the cumsum
    # by L u, the shifts and the final subtraction by 3 u; every partial sum is <= 1.5. In all (L + m + 7) u
    # < (L + m + 4) eps, so widening inexact brackets by twice that keeps them certified.
    tol = 2.0 * (n_keys + m + 4) * torch.finfo(work).eps
    high = torch.where(exact, delta_exact, delta_high + tol).clamp_(0.0, 0.5)
    low = torch.where(exact, delta_exact, delta_low.to(torch.float64) - tol).clamp_(0.0, 0.5)
    return high, low, exact


def balanced_mass_factor(probs: Tensor, *, exact_top: int = 10, validate: bool = True) -> ThetaBounds:
    """Certified bracket ``[lower, upper]`` on the balanced-mass factor theta of every row.

    The ``m = min(exact_top, L)`` largest entries are enumerated exactly (``2**(m-1)`` subset sums, one
    matmul); the remaining tail of mass ``T`` is treated as "fill anything in [0, T]" for the upper bound and
    as a staircase of its index-order prefix sums (steps at most the m-th largest entry) for the lower bound,
    which is therefore attained by a real subset: the stair nearest to each subset of the top entries, where
    beyond 64 subsets only the best one and those within two items of it are searched. ``1 - p_max**2`` is
    also a lower bound. The width is at most about the square of the m-th largest entry.

    Exact (``lower == upper``) when the row's support is at most ``exact_top`` or ``max(p) >= 1/2``. The
    ``N*2**(m-1)`` part runs in float32 for float32 and half inputs (float64 for float64 input): its rounding
    is below ``(L+m+4) eps`` in delta (``eps`` of the work dtype; see the bound in the code), and inexact
    brackets are widened by twice that and, for float32 output, moved outward by ``2**-25`` before the cast,
    so they contain the exact-arithmetic theta of the input's values. Exact rows are evaluated in float64 (the
    peak, or the best subset of the top entries summed again) and rounded to nearest. Rows are divided by
    their own sum first. Cost: one ``topk`` and one ``cumsum`` over ``[N, L]``, one matmul, one ``abs`` and
    one ``amin`` over ``N*2**(m-1)`` elements, and one ``searchsorted`` of ``2**(m-1)`` queries per row while
    that is at most 64, ``1+m(m-1)/2`` beyond (no sort, no host sync), in blocks of ``2**21`` elements on CPU
    and ``2**23`` on other devices.

    Args:
        probs: ``[..., L]`` probability rows (any float dtype, any device).
        exact_top: how many of the largest entries to enumerate exactly (1..20).
        validate: check the input and raise ``ValueError`` on negative entries (below ``-1e-6`` for float32,
            ``-1e-12`` float64, ``-1e-3`` half types) or finite rows whose sum is off 1 by more than ``1e-3``
            (float32), ``1e-6`` (float64) or ``2e-2`` (float16/bfloat16). Costs one host sync; ``False``
            skips it.

    Returns:
        ThetaBounds of shape ``probs.shape[:-1]``, float32 (float64 for float64 input). Rows with a non-finite
        entry (or, when not validated, a zero sum) give NaN in both bounds.

    Example:
        >>> b = balanced_mass_factor(torch.tensor([[0.4, 0.1, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1]]))
        >>> b.lower, b.upper
        (tensor([1.0000, 0.8400]), tensor([1.0000, 0.8400]))
    """
    out_dtype = _out_dtype(probs.dtype)
    _check_shape(probs)
    if isinstance(exact_top, bool) or not isinstance(exact_top, int) or not 1 <= exact_top <= MAX_EXACT_TOP:
        raise ValueError(f"exact_top must be an int in [1, {MAX_EXACT_TOP}], got {exact_top!r}")
    if validate:
        _validate_rows(probs)
    batch_shape = probs.shape[:-1]
    n_keys = probs.shape[-1]
    m = min(exact_top, n_keys)
    rows, raw, total64, ok = _bracket_inputs(probs)
    n_rows = rows.shape[0]
    block = _BLOCK_ELEMENTS if rows.device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    chunk = max(1, block >> (m - 1))
    parts = [
        _bracket_block(rows[i : i + chunk], raw[i : i + chunk], total64[i : i + chunk], m)
        for i in range(0, n_rows, chunk)
    ]
    if len(parts) == 1:
        high, low, exact = parts[0]
    else:
        high, low, exact = (torch.cat(t) for t in zip(*parts))
    delta = torch.stack([high, low])
    theta = delta.square_().mul_(-4.0).add_(1.0)  # [2, N]: lower, upper
    if out_dtype != torch.float64:
        # Round outward: moving an inexact bound by half a float32 ulp at 1 (2**-25) before the cast to
        # nearest keeps lower <= its float64 value <= upper for all values in [0, 1]. Exact rows: to nearest.
        shift = torch.where(exact, 0.0, 2.0**-25)
        theta[0].sub_(shift)
        theta[1].add_(shift)
    theta = theta.to(out_dtype).clamp_(0.0, 1.0)
    theta = torch.where(ok, theta, torch.full((), float("nan"), dtype=out_dtype, device=theta.device))
    lower, upper = theta.reshape(2, *batch_shape).unbind(0)
    return ThetaBounds(lower, upper)


def balanced_mass_greedy(probs: Tensor) -> Tensor:
    """The paper's sorted-prefix heuristic: theta of the descending-sorted prefix whose mass is nearest 1/2.

    Kept only for comparison: it is a lower bound on theta (a real subset), not the value. On
    ``(0.4, 0.1, 0.4, 0.1)`` it gives 0.96 while theta is 1.

    Args:
        probs: ``[..., L]`` probability rows (normalised by their sums; no validation).

    Returns:
        ``probs.shape[:-1]``, float32 (float64 for float64 input); NaN for non-finite rows.

    Example:
        >>> balanced_mass_greedy(torch.tensor([0.4, 0.1, 0.4, 0.1]))
        tensor(0.9600)
    """
    dtype = _out_dtype(probs.dtype)
    _check_shape(probs)
    x = probs.detach().to(dtype).clamp_min(0.0)
    x = x / x.sum(dim=-1, keepdim=True)
    prefix = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, dim=-1)
    delta = (prefix - 0.5).abs().amin(dim=-1)
    return (1.0 - 4.0 * delta.square()).clamp(0.0, 1.0)


def _min_distance_to_half(rows: Tensor) -> Tensor:
    """``min_S |p(S) - 1/2|`` over all ``2**L`` subsets of each float64 row ``[N, L]``, by brute force.

    Every subset sum is formed explicitly as ``low + high`` with ``low`` the subset sums of the first
    ``L // 2`` entries and ``high`` those of the rest, in blocks that bound memory.
    """
    n_rows, n_keys = rows.shape
    n_low = n_keys // 2

    def subset_sums(part: Tensor) -> Tensor:
        k = part.shape[-1]
        codes = torch.arange(1 << k, device=part.device)
        bits = ((codes.unsqueeze(0) >> torch.arange(k, device=part.device).unsqueeze(1)) & 1).to(part.dtype)
        return part @ bits  # [N, 2**k]

    low = subset_sums(rows[:, :n_low])
    high = subset_sums(rows[:, n_low:])
    per_row = low.shape[-1] * high.shape[-1]
    best = torch.full((n_rows,), float("inf"), dtype=rows.dtype, device=rows.device)
    if per_row <= _BLOCK_ELEMENTS:
        step = max(1, _BLOCK_ELEMENTS // per_row)
        for i in range(0, n_rows, step):
            d = (low[i : i + step, :, None] + high[i : i + step, None, :] - 0.5).abs()
            best[i : i + step] = d.flatten(1).amin(dim=-1)
    else:
        step = max(1, _BLOCK_ELEMENTS // low.shape[-1])
        for i in range(n_rows):
            for h in range(0, high.shape[-1], step):
                d = (low[i, :, None] + high[i, None, h : h + step] - 0.5).abs().amin()
                best[i] = torch.minimum(best[i], d)
    return best


def balanced_mass_exhaustive(probs: Tensor) -> Tensor:
    """Reference theta by enumerating all ``2**L`` subsets in float64 (``L <= 24``).

    Args:
        probs: ``[..., L]`` rows (normalised by their sums in float64; no validation).

    Returns:
        ``probs.shape[:-1]``, float64; NaN for rows with a non-finite entry or a zero sum.

    Example:
        >>> balanced_mass_exhaustive(torch.tensor([0.4, 0.1, 0.4, 0.1]))
        tensor(1., dtype=torch.float64)
    """
    _out_dtype(probs.dtype)
    _check_shape(probs)
    n_keys = probs.shape[-1]
    if n_keys > MAX_EXHAUSTIVE_LENGTH:
        raise ValueError(
            f"balanced_mass_exhaustive enumerates 2**L subsets and accepts L <= {MAX_EXHAUSTIVE_LENGTH}, got "
            f"L = {n_keys}; use balanced_mass_factor for long rows"
        )
    rows, ok = _normalised_rows(probs)
    delta = _min_distance_to_half(rows)
    theta = (1.0 - 4.0 * delta.square()).clamp(0.0, 1.0)
    theta = torch.where(ok, theta, torch.full((), float("nan"), dtype=theta.dtype, device=theta.device))
    return theta.reshape(probs.shape[:-1])


def softmax_jacobian_norm(probs: Tensor, tau: float = 1.0) -> Tensor:
    """Exact ``l_inf -> l_1`` norm of the softmax Jacobian ``J = (Diag(p) - p p^T) / tau``, by brute force.

    Evaluates ``max ||J x||_1`` over every sign vector ``x`` in ``{-1, +1}^L`` (the vertices of the l_inf
    ball, where a convex function reaches its maximum; ``x`` and ``-x`` give the same value, so half are
    enumerated), in float64 and for ``L <= 20``. ``p`` is used as given, not normalised; Theorem 4.2
    (``= theta(p) / tau``) needs rows on the simplex. Independent of the subset-sum code, so tests can check
    one against the other.

    Args:
        probs: ``[..., L]`` rows.
        tau: softmax temperature, > 0.

    Returns:
        ``probs.shape[:-1]``, float64.

    Example:
        >>> softmax_jacobian_norm(torch.tensor([0.4, 0.1, 0.4, 0.1]), tau=2.0)
        tensor(0.5000, dtype=torch.float64)
    """
    _out_dtype(probs.dtype)
    _check_shape(probs)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    n_keys = probs.shape[-1]
    if n_keys > MAX_JACOBIAN_LENGTH:
        raise ValueError(
            f"softmax_jacobian_norm enumerates 2**L sign vectors and accepts L <= {MAX_JACOBIAN_LENGTH}, "
            f"got L = {n_keys}"
        )
    p = probs.detach().reshape(-1, n_keys).to(torch.float64)
    jac = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / tau  # [N, L, L]
    # Sign vectors with x_0 = +1; the other half is their negation.
    n_free = n_keys - 1
    codes = torch.arange(1 << n_free, device=p.device)
    free = 1.0 - 2.0 * ((codes.unsqueeze(1) >> torch.arange(n_free, device=p.device)) & 1).to(torch.float64)
    signs = torch.cat([torch.ones(free.shape[0], 1, dtype=torch.float64, device=p.device), free], dim=1)
    best = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
    k_step = min(signs.shape[0], max(1, _BLOCK_ELEMENTS // n_keys))
    r_step = max(1, _BLOCK_ELEMENTS // (k_step * n_keys))
    for r in range(0, p.shape[0], r_step):
        for k in range(0, signs.shape[0], k_step):
            jx = torch.einsum("nij,kj->nki", jac[r : r + r_step], signs[k : k + k_step])  # [n, K, L]
            best[r : r + r_step] = torch.maximum(best[r : r + r_step], jx.abs().sum(dim=-1).amax(dim=-1))
    return best.reshape(probs.shape[:-1])


def attention_entropy(probs: Tensor) -> Tensor:
    """Shannon entropy ``-sum p log p`` of each row in nats, with ``0 log 0 = 0`` (no normalisation).

    Args:
        probs: ``[..., L]`` probability rows.

    Returns:
        ``probs.shape[:-1]``, float32 (float64 for float64 input); NaN for rows with a NaN entry.

    Example:
        >>> attention_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    dtype = _out_dtype(probs.dtype)
    _check_shape(probs)
    return torch.special.entr(probs.detach().to(dtype)).sum(dim=-1)
