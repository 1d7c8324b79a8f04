"""Averaged partial Jacobian norm (APJN) between two hidden states.

``APJN = ||d h_l / d h_l0||_F**2 / n_out`` where ``n_out`` is the number of output elements. For one hidden
vector of width ``d`` that is ``||J||_F**2 / d``; for a batch of independent samples it is the mean of the
per-sample values. Pre-LN transformers keep it growing like a power law with depth (critical); tanh-like
normalisers (DyT) give stretched-exponential behaviour.

:func:`apjn_with_stderr` and :func:`apjn_profile` also return the standard error of the Hutchinson estimate
(from the spread of the per-probe values), and the profile measures many later states against one earlier
state from a single forward, which is what a depth profile needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "apjn_profile",
    "apjn_with_stderr",
    "averaged_partial_jacobian_norm",
    "averaged_partial_jacobian_norm_exact",
]

#: Largest ``n_in * n_out`` the dense reference accepts (a 4096 x 4096 Jacobian is 64 MiB in float32).
MAX_DENSE_ENTRIES = 4096 * 4096


def _rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    gen_device = generator.device if generator is not None else like.device
    bits = torch.randint(0, 2, like.shape, generator=generator, device=gen_device)
    return (bits * 2 - 1).to(device=like.device, dtype=like.dtype)


def averaged_partial_jacobian_norm(
    fn: Callable[[Tensor], Tensor],
    h0: Tensor,
    *,
    n_probes: int = 8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ``||d fn(h0) / d h0||_F**2 / fn(h0).numel()``.

    Uses ``E_w ||J^T w||^2 = ||J||_F^2`` for Rademacher probes ``w`` on the output: one forward, then one
    vector-Jacobian product (backward with ``retain_graph``) per probe. Works for any differentiable ``fn``
    (modules with hooks, fused kernels without forward-mode AD). Parameter ``.grad`` fields are not touched.
    The estimate is unbiased; its relative standard error falls like ``1/sqrt(n_probes)`` (smaller when the
    Jacobian is close to a multiple of an orthogonal matrix).

    Args:
        fn: maps ``h0`` to the later hidden state ``h_l`` (any shapes).
        h0: the earlier hidden state (floating point).
        n_probes: number of random probes, >= 1.
        generator: random generator for the probes (its device may differ from ``h0``'s).

    Returns:
        0-dim float32 tensor (float64 for float64 outputs), detached, on the output's device.

    Raises:
        ValueError: if ``n_probes < 1`` or ``h0`` is not floating point.

    Example:
        >>> w = torch.eye(4) * 2.0
        >>> float(averaged_partial_jacobian_norm(lambda h: h @ w.T, torch.randn(3, 4), n_probes=4))
        4.0
    """
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"averaged_partial_jacobian_norm: n_probes must be an int >= 1, got {n_probes!r}")
    if not h0.is_floating_point():
        raise ValueError(f"averaged_partial_jacobian_norm: h0 must be floating point, got {h0.dtype}")
    with torch.enable_grad():
        x = h0.detach().requires_grad_(True)
        out = fn(x)
        acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc_dtype, device=out.device)
        for i in range(n_probes):
            w = _rademacher(out, generator)
            (g,) = torch.autograd.grad(
                out, x, grad_outputs=w, retain_graph=i < n_probes - 1, allow_unused=True
            )
            if g is not None:
                total = total + g.to(acc_dtype).square().sum()
    return (total / (n_probes * out.numel())).detach()


def averaged_partial_jacobian_norm_exact(fn: Callable[[Tensor], Tensor], h0: Tensor) -> Tensor:
    """Exact APJN from the dense Jacobian (``torch.autograd.functional.jacobian``), for small sizes and tests.

    Args:
        fn: maps ``h0`` to the later hidden state.
        h0: the earlier hidden state.

    Returns:
        0-dim tensor ``||J||_F**2 / fn(h0).numel()`` in the output's dtype (at least float32).

    Raises:
        ValueError: if the dense Jacobian would have more than :data:`MAX_DENSE_ENTRIES` entries.

    Example:
        >>> float(averaged_partial_jacobian_norm_exact(lambda h: 3.0 * h, torch.randn(2, 5)))
        9.0
    """
    with torch.no_grad():
        n_out = fn(h0.detach()).numel()
    if n_out * h0.numel() > MAX_DENSE_ENTRIES:
        raise ValueError(
            f"averaged_partial_jacobian_norm_exact: dense Jacobian of {n_out} x {h0.numel()} "
            f"entries exceeds {MAX_DENSE_ENTRIES}; use averaged_partial_jacobian_norm"
        )
    jac = torch.autograd.functional.jacobian(fn, h0.detach())
    assert isinstance(jac, Tensor)
    acc_dtype = torch.float64 if jac.dtype == torch.float64 else torch.float32
    return (jac.to(acc_dtype).square().sum() / n_out).detach()


def _check_probes(owner: str, n_probes: object) -> int:
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise ValueError(
            f"{owner}: n_probes must be an int >= 2 (a standard error needs two), got {n_probes!r}"
        )
    return n_probes


def apjn_profile(
    outputs: Sequence[Tensor],
    h0: Tensor,
    *,
    n_probes: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson APJN of every tensor in ``outputs`` with respect to ``h0``, with standard errors.

    ``outputs`` must already hang off ``h0`` in the autograd graph (``h0`` requires grad; typically one
    forward through a stack with ``outputs[l]`` the output of block ``l``). For each output and each probe it
    takes one vector-Jacobian product with a fresh Rademacher probe ``w`` and records
    ``q = ||J^T w||^2 / n_out``; the estimate is the mean of the ``q`` and its standard error
    ``std(q) / sqrt(n_probes)``. Only ``h0`` receives gradients (parameter ``.grad`` fields are untouched);
    the graph is kept (``retain_graph``) so the caller decides when it is freed.

    Args:
        outputs: later hidden states ``h_l``, each a differentiable function of ``h0`` (any shapes).
        h0: the earlier hidden state (a leaf or any tensor that requires grad).
        n_probes: probes per output, >= 2.
        generator: random generator for the probes (its device may differ from ``h0``'s).

    Returns:
        ``(apjn [L], stderr [L])`` float32 (float64 for float64 outputs), detached; an output that does not
        depend on ``h0`` gets 0.

    Raises:
        ValueError: if ``n_probes < 2`` or ``h0`` does not require grad.

    Example:
        >>> x = torch.randn(2, 3, requires_grad=True)
        >>> mean, se = apjn_profile([2.0 * x, x[:, :1] * 1.0], x, n_probes=3)
        >>> mean.tolist(), se.tolist()
        ([4.0, 1.0], [0.0, 0.0])
    """
    n_probes = _check_probes("apjn_profile", n_probes)
    if not h0.requires_grad:
        raise ValueError("apjn_profile: h0 must require grad (run the forward from h0.requires_grad_())")
    dtype = torch.float64 if any(o.dtype == torch.float64 for o in outputs) else torch.float32
    means: list[Tensor] = []
    errs: list[Tensor] = []
    for out in outputs:
        q = torch.zeros(n_probes, dtype=dtype, device=out.device)  # [P] per-probe ||J^T w||^2 / n_out
        if out.requires_grad:
            for i in range(n_probes):
                w = _rademacher(out, generator)
                (g,) = torch.autograd.grad(out, h0, grad_outputs=w, retain_graph=True, allow_unused=True)
                if g is not None:
                    q[i] = g.to(dtype).square().sum() / out.numel()
        means.append(q.mean())
        errs.append(q.std(correction=1) / math.sqrt(n_probes))
    empty = torch.zeros(0, dtype=dtype, device=h0.device)
    if not outputs:
        return empty, empty.clone()
    return torch.stack(means).detach(), torch.stack(errs).detach()


def apjn_with_stderr(
    fn: Callable[[Tensor], Tensor],
    h0: Tensor,
    *,
    n_probes: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`averaged_partial_jacobian_norm` plus the standard error of the estimate (0-dim tensors).

    Example:
        >>> est, se = apjn_with_stderr(lambda h: 3.0 * h, torch.randn(4, 2), n_probes=4)
        >>> float(est), float(se)
        (9.0, 0.0)
    """
    n_probes = _check_probes("apjn_with_stderr", n_probes)
    if not h0.is_floating_point():
        raise ValueError(f"apjn_with_stderr: h0 must be floating point, got {h0.dtype}")
    with torch.enable_grad():
        x = h0.detach().requires_grad_(True)
        mean, err = apjn_profile([fn(x)], x, n_probes=n_probes, generator=generator)
    return mean[0], err[0]
