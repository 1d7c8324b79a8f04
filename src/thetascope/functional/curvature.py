"""Loss curvature from Hessian-vector products: sharpness, preconditioned sharpness, traces, Taylor check.

Everything works on flat vectors (all parameters concatenated, ``[n]``) and on an :data:`HVP` callable
``v -> H v``, so the same solvers run on the plain Hessian, on the preconditioned operator ``D H D`` and on
Hessians whose products are averaged across data-parallel ranks. No function here syncs the host: iteration
counts are fixed, and convergence is reported as a residual tensor instead of being tested in a loop.

Backends for ``H v``:

* :func:`double_backward_hvp`: exact, one extra backward per product through a retained first-order graph;
  needs every op to have a double backward (SDPA's flash and memory-efficient kernels do not).
* :func:`finite_difference_hvp`: ``(g(θ + εv) - g(θ - εv)) / 2ε`` from two gradient evaluations, with a step
  per dtype (:func:`fd_step`); works with any kernel, at two forward/backward passes per product.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HVP",
    "EigenResult",
    "adam_preconditioner",
    "compute_dtype",
    "double_backward_hvp",
    "fd_step",
    "finite_difference_hvp",
    "flatten",
    "group_mean_stderr",
    "hutchinson_samples",
    "lanczos_top",
    "power_iteration_top",
    "preconditioned",
    "stability_threshold",
    "swapped_values",
    "taylor_prediction",
    "unflatten",
]

#: ``H v`` on flat vectors: ``[n] -> [n]``.
HVP = Callable[[Tensor], Tensor]
#: Averages a tensor over data-parallel ranks (identity in one process).
AllReduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Concatenate ``tensors`` into one ``[n]`` vector of ``dtype``; ``None`` counts as zeros of ``like``.

    Example:
        >>> a, b = torch.ones(2, 2), torch.zeros(3)
        >>> flatten([a, None], [a, b], torch.float64).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    """
    parts = [
        (t if t is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for t, p in zip(tensors, like)
    ]
    return torch.cat(parts)


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split ``[n]`` into tensors shaped (and typed) like ``like``.

    Example:
        >>> [t.shape for t in unflatten(torch.arange(5.0), [torch.ones(2, 2), torch.ones(1)])]
        [torch.Size([2, 2]), torch.Size([1])]
    """
    sizes = [p.numel() for p in like]
    return [c.view_as(p).to(p.dtype) for c, p in zip(flat.split(sizes), like)]


def compute_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float64 when any parameter is float64, else float32 (half-precision parameters get float32 vectors)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


@contextlib.contextmanager
def swapped_values(params: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Copy ``values`` into ``params`` for the block, then copy the originals back bitwise.

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([1.0]))
        >>> with swapped_values([p], [torch.tensor([5.0])]):
        ...     float(p.detach())
        5.0
        >>> float(p.detach())
        1.0
    """
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _grads(loss: Tensor, params: Sequence[Tensor], create_graph: bool) -> tuple[Tensor | None, ...]:
    return torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)


def double_backward_hvp(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    all_reduce: AllReduce = _identity,
) -> tuple[HVP, Tensor, Tensor]:
    """Exact ``H v`` by double backward through one retained gradient graph.

    Args:
        loss_fn: computes the (local) loss from the current parameter values.
        params: the parameters (leaves with ``requires_grad``); their ``.grad`` is never touched.
        all_reduce: averages over data-parallel ranks; applied to the loss, gradient and every product
            (``autograd.grad`` bypasses DDP's gradient hooks, so the average has to be taken here).

    Returns:
        ``(hvp, loss, grad)``: the product callable and the (averaged) loss and flat gradient.

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hvp, loss, g = double_backward_hvp(lambda: (w ** 3).sum(), [w])
        >>> hvp(torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist()  # H = diag(6 w)
        [6.0, 12.0]
    """
    dtype = compute_dtype(params)
    loss = loss_fn()
    grads = _grads(loss, params, create_graph=True)
    used = [(g, p) for g, p in zip(grads, params) if g is not None and g.requires_grad]
    grad_flat = all_reduce(flatten([g.detach() if g is not None else None for g in grads], params, dtype))

    def hvp(v: Tensor) -> Tensor:
        vs = unflatten(v, params)
        if not used:
            return torch.zeros_like(v)
        outs = [g for g, _ in used]
        vecs = [vs[i] for i, (g, p) in enumerate(zip(grads, params)) if g is not None and g.requires_grad]
        hv = torch.autograd.grad(outs, list(params), grad_outputs=vecs, retain_graph=True, allow_unused=True)
        return all_reduce(flatten(hv, params, dtype))

    return hvp, all_reduce(loss.detach().to(dtype)), grad_flat


#: Central-difference step per dtype, ``u^(1/3)`` for unit roundoff ``u`` (balances O(ε²) truncation against
#: O(u/ε) rounding).
_FD_STEPS: dict[torch.dtype, float] = {
    torch.float64: float(torch.finfo(torch.float64).eps) ** (1 / 3),
    torch.float32: float(torch.finfo(torch.float32).eps) ** (1 / 3),
    torch.bfloat16: float(torch.finfo(torch.bfloat16).eps) ** (1 / 3),
    torch.float16: float(torch.finfo(torch.float16).eps) ** (1 / 3),
}


def fd_step(dtype: torch.dtype) -> float:
    """Relative central-difference step for parameters of ``dtype``.

    Example:
        >>> round(fd_step(torch.float32), 5), fd_step(torch.float64) < 1e-5
        (0.00492, True)
    """
    return _FD_STEPS.get(dtype, _FD_STEPS[torch.float32])


def finite_difference_hvp(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    all_reduce: AllReduce = _identity,
    step: float | None = None,
) -> tuple[HVP, Tensor, Tensor]:
    """``H v ≈ (g(θ + εv) - g(θ - εv)) / 2ε``: two gradient evaluations per product, any kernel.

    ``ε = step · ‖v ⊙ θ‖ / ‖v‖²`` (``step`` from :func:`fd_step` of the parameters' dtype unless given), so
    each product moves the parameters by ``step`` times their own magnitude along ``v``; kept on the device.
    The parameters are perturbed in place and restored bitwise from a copy after every product.

    Returns:
        ``(hvp, loss, grad)`` as :func:`double_backward_hvp`.

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hvp, _, _ = finite_difference_hvp(lambda: (w ** 3).sum(), [w])
        >>> [round(x, 6) for x in hvp(torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist()]
        [6.0, 12.0]
    """
    dtype = compute_dtype(params)
    rel = fd_step(params[0].dtype) if step is None else float(step)
    theta = [p.detach().clone() for p in params]
    theta_flat = flatten(theta, params, dtype)
    tiny = torch.finfo(dtype).tiny
    # floor for directions into zero-initialised parameters (biases): a tenth of the overall RMS
    floor = (torch.linalg.vector_norm(theta_flat) / max(theta_flat.numel(), 1) ** 0.5 * 0.1).clamp_min(tiny)

    def grad_at() -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            loss = loss_fn()
            return loss.detach().to(dtype), flatten(_grads(loss, params, create_graph=False), params, dtype)

    loss, grad = grad_at()

    def hvp(v: Tensor) -> Tensor:
        # the displacement ε‖v‖ is `rel` times the parameters' magnitude where v points (a v-weighted RMS):
        # a norm over all parameters would move small tensors (embeddings at 0.02) by a large fraction
        v_norm = torch.linalg.vector_norm(v).clamp_min(tiny)
        scale = torch.linalg.vector_norm(v * theta_flat) / v_norm
        eps = rel * torch.maximum(scale, floor) / v_norm
        diffs = []
        for sign in (1.0, -1.0):
            moved = unflatten(theta_flat + sign * eps * v, params)
            with swapped_values(params, moved):
                diffs.append(grad_at()[1])
        return all_reduce((diffs[0] - diffs[1]) / (2.0 * eps))

    return hvp, all_reduce(loss), all_reduce(grad)


@dataclass
class EigenResult:
    """Top eigenpair estimate: ``value`` (0-dim), unit ``vector`` ``[n]``, ``residual`` ‖Hx − λx‖/|λ|."""

    value: Tensor
    vector: Tensor
    residual: Tensor
    iters: int


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)


def power_iteration_top(hvp: HVP, v0: Tensor, iters: int) -> EigenResult:
    """Largest-magnitude eigenvalue by ``iters`` power steps from ``v0`` (warm start), Rayleigh quotient.

    Example:
        >>> h = torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=torch.float64))
        >>> r = power_iteration_top(lambda v: h @ v, torch.ones(3, dtype=torch.float64), 60)
        >>> round(float(r.value), 6), float(r.residual) < 1e-6
        (3.0, True)
    """
    v = _unit(v0)
    value = torch.zeros((), dtype=v.dtype, device=v.device)
    residual = torch.full((), math.inf, dtype=v.dtype, device=v.device)
    for _ in range(max(iters, 1)):
        w = hvp(v)
        value = torch.dot(v, w)
        residual = torch.linalg.vector_norm(w - value * v) / value.abs().clamp_min(torch.finfo(v.dtype).tiny)
        v = _unit(w)
    return EigenResult(value, v, residual, max(iters, 1))


def lanczos_top(hvp: HVP, v0: Tensor, iters: int, generator: torch.Generator | None = None) -> EigenResult:
    """Algebraically largest eigenvalue by ``iters`` Lanczos steps from ``v0``, fully reorthogonalised.

    The Ritz value converges much faster than power iteration and never picks a large negative eigenvalue.
    Memory: ``iters`` vectors of length ``n``. The residual is the Lanczos estimate ``β_m |y_m| / |λ|``.
    When the Krylov space is exhausted (β ≈ 0) a random vector orthogonal to it continues the basis, chosen
    on the device without a host round trip.

    Example:
        >>> h = torch.diag(torch.tensor([3.0, 1.0, -5.0], dtype=torch.float64))
        >>> round(float(lanczos_top(lambda v: h @ v, torch.ones(3, dtype=torch.float64), 3).value), 9)
        3.0
    """
    n = v0.numel()
    m = max(1, min(iters, n))
    dtype, device = v0.dtype, v0.device
    basis = torch.zeros(m, n, dtype=dtype, device=device)
    alpha = torch.zeros(m, dtype=dtype, device=device)
    beta = torch.zeros(m, dtype=dtype, device=device)
    q = _unit(v0)
    tol = torch.finfo(dtype).eps ** 0.5
    # one random vector (drawn once, on the CPU so every rank draws the same) continues an exhausted basis
    fresh = torch.randn(n, generator=generator, dtype=dtype, device="cpu").to(device) if m > 1 else None
    for j in range(m):
        basis[j] = q
        w = hvp(q)
        alpha[j] = torch.dot(q, w)
        prev = basis[: j + 1]
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - prev.T @ (prev @ w)
        b = torch.linalg.vector_norm(w)
        beta[j] = b
        if j + 1 < m and fresh is not None:
            r = fresh
            for _ in range(2):
                r = r - prev.T @ (prev @ r)
            scale = b.abs() + torch.linalg.vector_norm(alpha[: j + 1]).clamp_min(1.0)
            q = torch.where(b > tol * scale, w / b.clamp_min(torch.finfo(dtype).tiny), _unit(r))
    t = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    evals, evecs = torch.linalg.eigh(t)
    value = evals[-1]
    y = evecs[:, -1]
    vector = _unit(basis.T @ y)
    residual = (beta[m - 1] * y[-1]).abs() / value.abs().clamp_min(torch.finfo(dtype).tiny)
    return EigenResult(value, vector, residual, m)


def preconditioned(hvp: HVP, inv_sqrt_p: Tensor) -> HVP:
    """The operator ``v -> D H D v`` with ``D = P^(-1/2)``: its eigenvalues are those of ``P⁻¹H``.

    Example:
        >>> h = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> d = torch.tensor([1.0, 0.5], dtype=torch.float64)
        >>> preconditioned(lambda v: h @ v, d)(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
        [2.0, 0.5]
    """
    return lambda v: inv_sqrt_p * hvp(inv_sqrt_p * v)


def hutchinson_samples(
    hvp: HVP, lengths: Sequence[int], samples: int, generator: torch.Generator, like: Tensor
) -> Tensor:
    """Per-segment Hutchinson samples ``z_s · (H z)_s``, ``[samples, S]``, for Rademacher ``z``.

    One product per sample serves every segment: ``E[z_sᵀ (H z)_s] = tr(H_ss)`` because the cross terms have
    zero mean. The Rademacher vectors come from ``generator`` on the CPU, so every rank draws the same ones.

    Args:
        hvp: the product.
        lengths: segment lengths summing to ``n`` (parameters, or slices of fused parameters).
        samples: number of probe vectors.
        generator: CPU generator.
        like: a ``[n]`` tensor giving dtype and device.
    """
    rows = []
    for _ in range(samples):
        z = torch.randint(0, 2, (like.numel(),), generator=generator, dtype=torch.int8)
        z = z.to(device=like.device, dtype=like.dtype).mul_(2).sub_(1)
        contrib = z * hvp(z)
        rows.append(torch.stack([c.sum() for c in contrib.split(list(lengths))]))
    return torch.stack(rows)


def group_mean_stderr(per_segment: Tensor, segment_group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Sum per-segment samples ``[k, S]`` into groups and return per-group ``(mean, standard error)``.

    The standard error is the sample standard deviation over ``k`` (NaN for ``k = 1``) over ``sqrt(k)``.

    Example:
        >>> s = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
        >>> m, se = group_mean_stderr(s, torch.tensor([0, 0, 1]), 2)
        >>> m.tolist(), se.tolist()
        ([4.0, 2.0], [1.0, 1.0])
    """
    k = per_segment.shape[0]
    grouped = torch.zeros(k, n_groups, dtype=per_segment.dtype, device=per_segment.device)
    grouped.index_add_(1, segment_group.to(per_segment.device), per_segment)
    mean = grouped.mean(0)
    if k < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, grouped.std(0, correction=1) / math.sqrt(k)


def adam_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    dtype: torch.dtype,
    lrs: Sequence[float] | None = None,
) -> tuple[Tensor, float, float] | None:
    """``(P^(-1/2) [n], lr_ref, β₁)`` for an Adam/AdamW optimizer after a step, or ``None`` without state.

    ``P = (sqrt(v / (1 - β₂^t)) + eps) · lr_ref / lr_group``: the bias-corrected second moment with eps, as
    the step divides by it, and each group's learning rate folded in relative to the largest (``lr_ref``),
    so ``λ_max(P⁻¹H)`` compares with ``(2 + 2β₁) / ((1 − β₁) lr_ref)``. AMSGrad uses its running maximum.
    ``lrs`` (one per param group) replaces the groups' current learning rates, e.g. the ones of the step
    taken before a scheduler moved them.
    """
    lr_of: dict[int, float] = {}
    group_of: dict[int, dict[str, Any]] = {}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            lr_of[id(p)] = float(lrs[i] if lrs is not None else group["lr"])
            group_of[id(p)] = group
    if not params or any(id(p) not in group_of for p in params):
        return None
    lr_ref = max(lr_of[id(p)] for p in params)
    if lr_ref <= 0:
        return None
    parts = []
    beta1 = float(group_of[id(params[0])]["betas"][0])
    for p in params:
        state = optimizer.state.get(p, {})
        group = group_of[id(p)]
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        if key not in state or "step" not in state:
            return None
        beta2 = float(group["betas"][1])
        v = state[key].detach().to(dtype)
        # the step count may be a tensor (on the device for capturable Adam): keep it there, no host read
        step = torch.as_tensor(state["step"], dtype=dtype).to(v.device)
        v_hat = v / (1.0 - torch.pow(torch.tensor(beta2, dtype=dtype, device=v.device), step))
        p_diag = (v_hat.sqrt() + float(group["eps"])) * (lr_ref / lr_of[id(p)])
        parts.append(p_diag.reshape(-1).rsqrt())
    return torch.cat(parts), lr_ref, beta1


def stability_threshold(
    optimizer: torch.optim.Optimizer | None, lrs: Sequence[float] | None = None
) -> tuple[str, float] | None:
    """``(kind, threshold)`` of the optimizer's first group: where its quadratic-model dynamics go unstable.

    * SGD without momentum: ``2 / lr`` (gradient descent's edge of stability, Cohen et al. 2021).
    * SGD with heavy-ball momentum ``β`` (and dampening ``d``): ``(2 + 2β) / ((1 − d) lr)``; Nesterov:
      ``(2 + 2β) / ((1 + 2β)(1 − d) lr)``.
    * Adam/AdamW: ``(2 + 2β₁) / ((1 − β₁) lr)`` for the preconditioned sharpness (38/lr at β₁ = 0.9,
      Cohen et al. 2022); with groups of different lr the largest is used (see :func:`adam_preconditioner`).

    ``kind`` is ``"sgd"`` or ``"adam"``; ``None`` for other optimizers or a zero learning rate. ``lrs`` (one
    per param group) replaces the groups' current learning rates.

    Example:
        >>> w = [torch.nn.Parameter(torch.zeros(1))]
        >>> stability_threshold(torch.optim.SGD(w, lr=0.1))
        ('sgd', 20.0)
        >>> kind, t = stability_threshold(torch.optim.AdamW(w, lr=0.01)); kind, round(t, 6)
        ('adam', 3800.0)
    """
    if optimizer is None or not optimizer.param_groups:
        return None
    groups = optimizer.param_groups
    lr = max(float(x) for x in (lrs if lrs is not None else [g["lr"] for g in groups]))
    if lr <= 0:
        return None
    g0 = groups[0]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        b1 = float(g0["betas"][0])
        return "adam", (2.0 + 2.0 * b1) / ((1.0 - b1) * lr)
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(g0.get("momentum", 0.0))
        damp = float(g0.get("dampening", 0.0)) if beta > 0 else 0.0
        eff = lr * (1.0 - damp)
        if beta > 0 and g0.get("nesterov"):
            return "sgd", (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * eff)
        return "sgd", (2.0 + 2.0 * beta) / eff
    return None


def taylor_prediction(grad: Tensor, delta: Tensor, h_delta: Tensor) -> tuple[Tensor, Tensor]:
    """First- and second-order predicted loss change of the step ``delta``: ``gᵀΔ`` and ``gᵀΔ + ½ΔᵀHΔ``.

    Example:
        >>> g, d, hd = torch.tensor([1.0, 0.0]), torch.tensor([-0.1, 0.2]), torch.tensor([0.2, 0.4])
        >>> [round(float(x), 6) for x in taylor_prediction(g, d, hd)]
        [-0.1, -0.07]
    """
    first = torch.dot(grad, delta)
    return first, first + 0.5 * torch.dot(delta, h_delta)
