"""Spectral norms of projection matrices by batched subspace iteration with persistent right vectors.

The exact spectral norm (an SVD) of every Q/K/V/O matrix of a large model costs seconds per call; a warm block
power iteration batched into a few ``bmm`` per distinct shape costs about a millisecond. Like
:func:`torch.nn.utils.parametrizations.spectral_norm`, the estimator keeps its vectors between calls, so each
call starts from the previous answer and only needs a few iterations while weights drift slowly during
training. It keeps a small block of right (input-dimension) singular vectors (subspace iteration on
``W^T W``, ``n_vectors=4``) rather than one: that converges faster, and it stays right when the top singular
values trade places, where one vector lags behind.

Sharding: the vectors live in the input dimension, so a matrix split by rows across ranks (each rank holds
``W_r``, a slice of dim -2) needs only ``W^T W V = sum_r W_r^T (W_r V)``: one all-reduce of a ``[k, n]`` block
per iteration and shape group, never a gather of the weight. Pass ``all_reduce`` to
:func:`power_iteration` or :class:`SpectralNormEstimator` for that; the vectors stay replicated.

Measured with ``python -m benchmarks spectral`` (CPU, float32, 768x768 matrices, 2 per kind; relative error
``1 - sigma_est / sigma_exact`` against a float64 SVD, max over the matrices; the estimate never exceeds the
truth). One iteration is one product with ``W^T W``. Trained-like = rank-8 spectrum decaying by 0.8 or 0.9 per
value plus Gaussian noise whose bulk edge is 0.25 of the top value; Gaussian = i.i.d. entries (the hard case:
the top values almost touch).

=================================  ======  ======  ======  ======  ======  ======  ======
cold start, iterations                4       8      12      16      32      64     128
=================================  ======  ======  ======  ======  ======  ======  ======
trained-like 0.8, 1 vector         1.5e-2  4.1e-4  1.3e-5  5.1e-7  8.1e-8  5.0e-8  5.0e-8
trained-like 0.8, 4 vectors        1.5e-5  5.0e-8  5.0e-8  5.0e-8  6.8e-8  5.0e-8  5.0e-8
trained-like 0.9, 1 vector         8.9e-2  1.2e-2  2.2e-3  4.1e-4  6.3e-7  4.2e-8  4.2e-8
trained-like 0.9, 4 vectors        1.6e-3  3.2e-5  2.1e-7  4.2e-8  4.2e-8  4.2e-8  4.2e-8
Gaussian, 1 vector                 1.1e-1  4.6e-2  2.8e-2  2.1e-2  8.8e-3  3.5e-3  6.8e-4
Gaussian, 4 vectors                8.2e-2  3.3e-2  1.8e-2  9.9e-3  1.3e-3  4.2e-4  1.8e-5
=================================  ======  ======  ======  ======  ======  ======  ======

Warm calls after a 64-step cold call, weights drifting by a random update of 1e-3 or 1e-2 of their Frobenius
norm before each of 5 calls: trained-like <= 6.4e-7 with 1, 2 or 4 steps per call and 1 or 4 vectors (<=
7.5e-8 with 2 or more steps); Gaussian 3.5e-3 with 1 vector, 4.2e-4 with 4 (each drift moves its nearly
degenerate top vector again). Top singular values trading places (value 1 falls from 1.0 to 0.7 while values 2
and 3 climb past it, 41 calls): worst error 9.2e-2 with 1 vector, 7.7e-5 with 2, 5.3e-8 with 4 (2 steps per
call; 256x256, to keep the 41 SVDs affordable on CPU).

Hence ``DEFAULT_N_VECTORS = 4``, ``DEFAULT_INIT_ITERS = 64`` (one-off; trained-like needs 8, and 64 brings
Gaussian weights, as at initialisation, to ~4e-4) and ``DEFAULT_POWER_ITERS = 2`` per warm call (1 sufficed in
every warm test on trained-like spectra; the second is margin for faster drift). Speed (CPU, 1 thread, the 42
projection matrices of a 6-layer d=128 model, warm call): 4.8 ms, against 33 ms for the previous Gram-Schmidt
block iteration; the cold 64-step call 122 ms against 612 ms.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CPU_STACK_ENTRIES",
    "DEFAULT_INIT_ITERS",
    "DEFAULT_N_VECTORS",
    "DEFAULT_POWER_ITERS",
    "AllReduce",
    "SpectralNormEstimator",
    "head_slices",
    "power_iteration",
]

#: Power-iteration steps per warm call (see the module docstring for the measurement behind it).
DEFAULT_POWER_ITERS = 2
#: Power-iteration steps on the first call for a matrix (cold start from random vectors).
DEFAULT_INIT_ITERS = 64
#: Vectors per matrix kept by :class:`SpectralNormEstimator` (subspace iteration; see its docstring).
DEFAULT_N_VECTORS = 4
#: Largest matrix (entries) that the CPU default of ``SpectralNormEstimator(stack=None)`` stacks: on 2
#: threads, stacking 24 ``[d, d]`` and 24 ``[4, d/4, d]`` matrices took 0.59x the time of the one-by-one
#: loop at d = 64, 0.73x at 128, 0.69x at 256, but 1.23x at 384 and 2.1x at 768.
CPU_STACK_ENTRIES = 1 << 16

#: Sums a tensor over the ranks that hold the row shards of the matrices and returns the sum (same shape).
AllReduce = Callable[[Tensor], Tensor]

# Layout tag of the saved vectors: right (input-dimension) vectors [H, k, n]. States without it hold the left
# vectors of older versions and are dropped with a warning.
_LAYOUT = "right"
# Shift of the orthonormalisation, relative to the block's Frobenius norm (see _orthonormalize).
_SHIFT = 1e-5
# Absolute floor of that shift in float64: keeps the Cholesky factor of an all-zero block finite.
_FLOOR = 1e-150


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Power iteration in bf16/fp16 loses the digits we want to report; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _random_block(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    gen_device = generator.device if generator is not None else device
    x = torch.randn(shape, dtype=torch.float64, device=gen_device, generator=generator).to(device)
    return _orthonormalize(x, x).to(dtype)


def _cholesky_qr(x: Tensor) -> Tensor:
    # rows of x [..., k, n] (float64, full row rank) -> orthonormal rows spanning the same leading subspaces
    gram = torch.matmul(x, x.mT)  # [..., k, k]
    chol, _ = torch.linalg.cholesky_ex(gram)  # _ex: no status check on the host, so no sync
    return torch.linalg.solve_triangular(chol, x, upper=False)


def _orthonormalize(z: Tensor, v: Tensor) -> Tensor:
    """Orthonormal rows ``[..., k, n]`` (float64) spanning ``z + c v``, by two Cholesky-QR passes.

    ``z = V A`` for the current orthonormal block ``v = V`` and ``A = W^T W``, so ``z + c v = V (A + c I)``
    keeps every row's direction of convergence (the shift only moves all eigenvalues by ``c``) while it makes
    the block full rank with condition number at most ``~1 / _SHIFT`` even for rank-deficient or zero
    matrices. The first pass in float64 then leaves rows orthonormal to ``~1e-6`` and the second to rounding.
    Row ``j`` of the result is the direction of row ``j`` with rows ``< j`` removed (as in Gram-Schmidt), so
    row 0 follows plain power iteration. No solver status is read back, so there is no host sync.
    """
    z64 = z.to(torch.float64)
    v64 = v.to(torch.float64)
    scale = torch.linalg.vector_norm(z64, dim=(-2, -1), keepdim=True)
    x = z64 + (_SHIFT * scale + _FLOOR) * v64
    return _cholesky_qr(_cholesky_qr(x))


def _top_eigenvalue(gram: Tensor, squarings: int = 10) -> Tensor:
    """Largest eigenvalue of the PSD ``gram [..., k, k]`` (a Ritz value), without a solver call.

    Repeated squaring (``G^1024`` after 10 squarings, trace-normalised) makes the power nearly rank one; its
    dominant column is the top eigenvector ``x`` and ``x^T G x`` its eigenvalue (any unit ``x`` gives a
    lower bound, so an unconverged ``x`` errs low). ``eigvalsh`` would check its status on the host. The max
    with the largest diagonal entry keeps it at least as good as the best single vector.
    """
    p = gram
    for _ in range(squarings):
        trace = p.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        p = p / trace.clamp_min(torch.finfo(p.dtype).tiny)
        p = torch.matmul(p, p)
    col = p.norm(dim=-2).argmax(-1)  # [...]
    x = torch.take_along_dim(p, col[..., None, None], dim=-1).squeeze(-1)
    x = torch.nn.functional.normalize(x, dim=-1)
    ritz = (x * torch.matmul(gram, x.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return torch.maximum(ritz, gram.diagonal(dim1=-2, dim2=-1).amax(-1)).clamp_min(0.0)


def _subspace_iteration(
    weights: list[Tensor], v: Tensor, n_iter: int, all_reduce: AllReduce | None
) -> tuple[Tensor, Tensor]:
    """Block power iteration on ``W^T W`` for matrices of one input width, iterated in lockstep.

    Args:
        weights: ``[b_i, m_i, n]`` blocks in the compute dtype (row shards when ``all_reduce`` is given);
            their batch sizes add up to ``B``.
        v: ``[B, k, n]`` orthonormal right vectors (rows).
        n_iter: steps.
        all_reduce: sums the ``[B, k, n]`` products over the shards (one call per step), or ``None``.

    Returns:
        ``(sigma [B], v [B, k, n])``. ``sigma = lambda_max(Z Z^T)^(1/4)`` for the last ``Z = V W^T W``: by
        Cauchy-Schwarz ``||A y|| >= y^T A y`` for unit ``y``, so it is a lower bound on ``||W||`` at least as
        tight as the Ritz value of ``V`` itself.
    """
    dtype = v.dtype
    z = v
    for _ in range(n_iter):
        parts: list[Tensor] = []
        start = 0
        for w in weights:
            vb = v[start : start + w.shape[0]]
            start += w.shape[0]
            parts.append(torch.matmul(torch.matmul(vb, w.mT), w))  # [b, k, m] then [b, k, n]
        z = parts[0] if len(parts) == 1 else torch.cat(parts)
        if all_reduce is not None:
            z = all_reduce(z)
        v_prev = v
        v = _orthonormalize(z, v_prev).to(dtype)
    z64 = z.to(torch.float64)
    sigma = _top_eigenvalue(torch.matmul(z64, z64.mT)).pow(0.25).to(dtype)
    return sigma, v


@torch.no_grad()
def power_iteration(
    weight: Tensor,
    v: Tensor | None = None,
    *,
    n_iter: int,
    eps: float = 1e-12,
    all_reduce: AllReduce | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Estimate the largest singular value of each matrix in a batch by power iteration on ``W^T W``.

    Each step computes ``y = W v`` and ``z = W^T y``, then ``v = z / ||z||``; the estimate is
    ``sigma = sqrt(||z||)`` of the last step, a lower bound on the spectral norm that converges from below.
    Runs under ``no_grad``; bf16/fp16 weights are iterated in float32 (float64 stays float64). No host
    synchronisation.

    Sharded matrices: with ``all_reduce``, ``weight`` is this rank's slice of the rows (dim -2) of each matrix
    and ``z`` is summed over the ranks once per step (``W^T W v = sum_r W_r^T W_r v``); ``v`` must be the same
    on every rank (pass it, or a ``generator`` seeded alike; without both, a fixed seed is used), and
    ``sigma`` and ``v`` are those of the full matrices.

    Args:
        weight: ``[..., m, n]`` matrices (leading dimensions are a batch), or their local row shards.
        v: ``[..., n]`` starting right vectors (e.g. the ``v`` returned by the previous call), or ``None`` for
            a random start.
        n_iter: number of power-iteration steps, at least 1.
        eps: floor of the vector norms in the normalisations (avoids 0/0 for zero matrices).
        all_reduce: sums a tensor over the shard group and returns the sum; ``None`` for whole matrices.
        generator: random generator for the random start (its device may differ from the weight's).

    Returns:
        ``(sigma, u, v)``: ``sigma`` ``[...]``, left vectors ``u = W v' / ||W v'||`` ``[..., m]`` (this rank's
        rows when sharded) of the last step's input ``v'``, and right vectors ``v`` ``[..., n]``, all in the
        compute dtype (float32 or float64).

    Raises:
        ValueError: if ``weight`` has fewer than 2 dimensions, ``n_iter < 1`` or ``v`` has the wrong shape.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> sigma, u, v = power_iteration(w, n_iter=30, generator=torch.Generator().manual_seed(0))
        >>> round(float(sigma), 4)
        3.0
    """
    if weight.ndim < 2:
        raise ValueError(
            f"power_iteration: weight must have at least 2 dimensions [..., m, n], got shape "
            f"{tuple(weight.shape)}"
        )
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"power_iteration: n_iter must be an int >= 1, got {n_iter!r}")
    dtype = _compute_dtype(weight.dtype)
    w = weight.detach().to(dtype)
    expected = (*w.shape[:-2], w.shape[-1])
    if v is None:
        if generator is None and all_reduce is not None:
            generator = torch.Generator().manual_seed(0)  # the same start on every rank
        gen_device = generator.device if generator is not None else w.device
        v = torch.randn(expected, dtype=dtype, device=gen_device, generator=generator).to(w.device)
        v = torch.nn.functional.normalize(v, dim=-1, eps=eps)
    else:
        if tuple(v.shape) != expected:
            raise ValueError(
                f"power_iteration: v must have shape {expected} (weight.shape[:-2] + (n,)) for weight of "
                f"shape {tuple(w.shape)}, got {tuple(v.shape)}"
            )
        v = v.detach().to(device=w.device, dtype=dtype)
    z = y = v
    v_in = v
    for _ in range(n_iter):
        v_in = v
        y = torch.matmul(v.unsqueeze(-2), w.mT)  # [..., 1, m]: (W v)^T
        z = torch.matmul(y, w).squeeze(-2)  # [..., n]: (W^T W v)^T
        if all_reduce is not None:
            z = all_reduce(z)
        v = torch.nn.functional.normalize(z, dim=-1, eps=eps)
    sigma = torch.linalg.vector_norm(z, dim=-1).sqrt()
    # ||W v'||^2 = v'^T W^T W v' = v' . z: the global norm of y without another reduction
    y_norm = (v_in * z).sum(-1).clamp_min(0.0).sqrt().clamp_min(eps)
    u = y.squeeze(-2) / y_norm.unsqueeze(-1)
    return sigma, u, v


def head_slices(weight: Tensor, n_heads: int, dim: int = 0) -> Tensor:
    """Split a projection matrix into per-head blocks (a view, no copy).

    Args:
        weight: ``[out, in]`` matrix in ``nn.Linear`` layout.
        n_heads: number of heads.
        dim: ``0`` splits the rows (output features; W_Q, W_K, W_V): result ``[H, out/H, in]``.
            ``1`` splits the columns (input features; W_O, whose inputs are the concatenated heads):
            result ``[H, out, in/H]``.

    Returns:
        The per-head blocks stacked along a new leading dimension.

    Raises:
        ValueError: if ``weight`` is not 2-D, ``dim`` is not 0 or 1, ``n_heads < 1`` or the split dimension is
            not divisible by ``n_heads``.

    Example:
        >>> head_slices(torch.zeros(768, 768), 12).shape
        torch.Size([12, 64, 768])
        >>> head_slices(torch.zeros(768, 768), 12, dim=1).shape
        torch.Size([12, 768, 64])
    """
    if weight.ndim != 2:
        raise ValueError(f"head_slices: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if dim not in (0, 1):
        raise ValueError(f"head_slices: dim must be 0 (split rows) or 1 (split columns), got {dim!r}")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"head_slices: n_heads must be an int >= 1, got {n_heads!r}")
    size = weight.shape[dim]
    if size % n_heads != 0:
        which = "rows (out_features)" if dim == 0 else "columns (in_features)"
        raise ValueError(
            f"head_slices: cannot split {size} {which} of a weight of shape {tuple(weight.shape)} "
            f"into n_heads={n_heads} equal heads ({size} % {n_heads} = {size % n_heads})"
        )
    out, inp = weight.shape
    if dim == 0:
        return weight.view(n_heads, out // n_heads, inp)
    return weight.view(out, n_heads, inp // n_heads).permute(1, 0, 2)


_GroupKey = tuple[int, int, torch.dtype, torch.device, bool]


class SpectralNormEstimator:
    """Spectral norms of many named matrices: a batched subspace iteration per shape group, warm across calls.

    Matrices of equal input width, dtype and device form a group that is iterated in lockstep: per step, the
    products ``W^T W V`` of its matrices (one ``bmm`` pair for the stacked group, see ``stack``), one batched
    orthonormalisation of all their vector blocks (two Cholesky-QR passes, no Python loop over vectors) and,
    when sharded, one all-reduce. A block of ``n_vectors`` orthonormal right vectors is kept per matrix (the
    estimate is a Ritz value of the block, a lower bound on the true norm), so after the first call
    (``init_iters`` steps) each call only needs ``n_iter`` steps; a key whose shape changes is started again.
    Vectors whose update is not finite (NaN/Inf weights) keep their previous value, so a transient overflow
    does not poison later calls; the returned norm for that call is non-finite. No host synchronisation.

    Sharded matrices: call it with ``all_reduce`` and each rank's row shards (dim -2 of every ``[.., m, n]``
    matrix split across the ranks; shards may differ in size). Every rank must pass the same keys in the same
    order, with the same input widths; the vectors and the returned norms are replicated and are those of the
    full matrices.

    Args:
        n_iter: steps per warm call (default :data:`DEFAULT_POWER_ITERS`, chosen from measurements, see the
            module docstring).
        init_iters: steps for the first call on a key (default :data:`DEFAULT_INIT_ITERS`).
        eps: norm floor in the normalisations.
        seed: seed of the random starting vectors (deterministic across runs and ranks).
        stack: stack the matrices of a group into one batched product (``True``) or multiply them one by one
            (``False``, no stacking copy; the orthonormalisation and the reduction stay batched). ``None``
            (default) stacks on accelerators, where one launch per group is what makes it cheap, and on CPU
            groups whose matrices have at most :data:`CPU_STACK_ENTRIES` entries each, where the per-call cost
            of many small products exceeds the copy; larger CPU matrices are multiplied one by one.
        n_vectors: vectors per matrix (default :data:`DEFAULT_N_VECTORS`; 1 is plain power iteration, which
            lags when top singular values trade places; capped at the input width ``n``).

    Example:
        >>> est = SpectralNormEstimator()
        >>> out = est({"q": torch.diag(torch.tensor([2.0, 1.0])), "heads": torch.eye(3).expand(4, 3, 3)})
        >>> round(float(out["q"]), 4), tuple(out["heads"].shape)
        (2.0, (4,))
    """

    def __init__(
        self,
        n_iter: int = DEFAULT_POWER_ITERS,
        init_iters: int = DEFAULT_INIT_ITERS,
        eps: float = 1e-12,
        seed: int = 0,
        stack: bool | None = None,
        n_vectors: int = DEFAULT_N_VECTORS,
    ) -> None:
        for name, value in (("n_iter", n_iter), ("init_iters", init_iters), ("n_vectors", n_vectors)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SpectralNormEstimator: {name} must be an int >= 1, got {value!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"SpectralNormEstimator: eps must be a number > 0, got {eps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SpectralNormEstimator: seed must be an int, got {seed!r}")
        self.n_iter = n_iter
        self.init_iters = init_iters
        self.eps = eps
        self.seed = seed
        self.stack = stack
        self.n_vectors = n_vectors
        self._v: dict[str, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    @torch.no_grad()
    def __call__(
        self, mats: Mapping[str, Tensor], *, all_reduce: AllReduce | None = None
    ) -> dict[str, Tensor]:
        """Spectral norms of the given matrices.

        Args:
            mats: key -> ``[m, n]`` matrix or ``[H, m, n]`` stack (e.g. from :func:`head_slices`); with
                ``all_reduce``, this rank's rows of them.
            all_reduce: sums a tensor over the shard group and returns it (one call per step and group);
                ``None`` for whole matrices.

        Returns:
            key -> 0-dim norm (for ``[m, n]``) or ``[H]`` norms (for ``[H, m, n]``), float32 (float64 for
            float64 weights), on the weight's device.

        Raises:
            ValueError: if a tensor is not 2-D or 3-D.
        """
        groups: dict[_GroupKey, list[tuple[str, Tensor, Tensor | None]]] = {}
        for key, w in mats.items():
            if w.ndim not in (2, 3):
                raise ValueError(
                    f"SpectralNormEstimator: weights[{key!r}] must be [m, n] or [H, m, n], got shape "
                    f"{tuple(w.shape)}"
                )
            w3 = w.detach().unsqueeze(0) if w.ndim == 2 else w.detach()
            dtype = _compute_dtype(w.dtype)
            n = int(w3.shape[-1])
            k = min(self.n_vectors, n)
            v = self._v.get(key)
            if v is not None and tuple(v.shape) != (w3.shape[0], k, n):
                v = None  # the key changed shape (or n_vectors changed): start it again
            if v is not None:
                v = v.to(device=w.device, dtype=dtype, non_blocking=True)
            # the group key leaves out the row count, which row shards need not share across ranks
            gk = (n, k, dtype, w.device, v is None)
            groups.setdefault(gk, []).append((key, w3, v))

        out: dict[str, Tensor] = {}
        for (n, k, dtype, device, cold), items in groups.items():
            sizes = [int(w3.shape[0]) for _, w3, _ in items]
            if cold:
                v_all = _random_block((sum(sizes), k, n), dtype, device, self._generator(device))
            else:
                v_all = torch.cat([v for _, _, v in items if v is not None])
            stack = self.stack
            if stack is None:
                stack = device.type != "cpu" or all(
                    w3.shape[-2] * w3.shape[-1] <= CPU_STACK_ENTRIES for _, w3, _ in items
                )
            weights: list[Tensor] = []
            order: list[int] = []  # item indices in the order of `weights` (stacking groups equal row counts)
            if stack:
                by_rows: dict[int, list[int]] = {}
                for i, (_, w3, _) in enumerate(items):
                    by_rows.setdefault(int(w3.shape[-2]), []).append(i)
                for idxs in by_rows.values():
                    order += idxs
                    parts = [items[i][1].to(dtype) for i in idxs]
                    weights.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            else:
                order = list(range(len(items)))
                weights = [w3.to(dtype) for _, w3, _ in items]
            offsets = [0]
            for s in sizes:
                offsets.append(offsets[-1] + s)
            if order != list(range(len(items))):
                v_all = torch.cat([v_all[offsets[i] : offsets[i + 1]] for i in order])
            sigma, v_new = _subspace_iteration(
                weights, v_all, self.init_iters if cold else self.n_iter, all_reduce
            )
            # keep the previous block where the new one is unusable (non-finite weights)
            ok = torch.isfinite(v_new).flatten(1).all(-1)
            v_keep = torch.where(ok[:, None, None], v_new, v_all)
            start = 0
            for i in order:
                key, h = items[i][0], sizes[i]
                self._v[key] = v_keep[start : start + h]
                out[key] = sigma[start] if mats[key].ndim == 2 else sigma[start : start + h]
                start += h
        return {key: out[key] for key in mats}

    def reset(self, key: str | None = None) -> None:
        """Forget the vectors of ``key`` (or of every key), so the next call starts it cold."""
        if key is None:
            self._v.clear()
        else:
            self._v.pop(key, None)

    def keys(self) -> list[str]:
        """Keys that currently hold warm vectors."""
        return list(self._v)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: ``{"layout": "right", "vectors": {key: CPU tensor [H, k, n]}, "n_iter", ...}``.

        Copies the vectors to the CPU (a device sync; call it only when checkpointing).
        """
        return {
            "layout": _LAYOUT,
            "vectors": {k: v.detach().cpu().clone() for k, v in self._v.items()},
            "n_iter": self.n_iter,
            "init_iters": self.init_iters,
            "n_vectors": self.n_vectors,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore vectors saved by :meth:`state_dict`; they move to each weight's device on the next call.

        ``n_iter``/``init_iters``/``n_vectors`` stay as constructed (stored for information only); a stored
        block whose shape does not fit (e.g. another ``n_vectors``) is started again on the next call. A state
        of an older version (left vectors, no ``"layout"``) is dropped with a warning: every key starts cold.

        Raises:
            ValueError: if ``state`` has no ``"vectors"`` mapping of tensors.
        """
        vectors = state.get("vectors") if isinstance(state, Mapping) else None
        if not isinstance(vectors, Mapping) or not all(isinstance(v, Tensor) for v in vectors.values()):
            raise ValueError(
                "SpectralNormEstimator.load_state_dict: expected {'vectors': {key: Tensor}}, got "
                f"{type(state).__name__} with keys {list(state) if isinstance(state, Mapping) else []}"
            )
        if state.get("layout") != _LAYOUT:
            warnings.warn(
                "SpectralNormEstimator.load_state_dict: the state holds left singular vectors of an older "
                "version; they are dropped and every matrix starts cold on the next call",
                stacklevel=2,
            )
            self._v = {}
            return
        self._v = {str(k): v.detach().clone() for k, v in vectors.items()}
