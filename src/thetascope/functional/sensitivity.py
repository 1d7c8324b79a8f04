"""Layer sensitivity: the projection-norm product, the sensitivity proxy and the MHA Lipschitz bound.

All functions take spectral norms (e.g. from :class:`~thetascope.functional.spectral.SpectralNormEstimator`),
not weight matrices, broadcast over leading dimensions, and stay on device (no host sync).
"""

from __future__ import annotations

import math

import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor

__all__ = ["mha_lipschitz_bound", "path_length_scale", "projection_norm_product", "sensitivity_proxy"]


def _check_tau(tau: float | Tensor, where: str) -> None:
    # a Python float is validated here; a device tensor is trusted (checking it would sync)
    if not isinstance(tau, Tensor) and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{where}: tau must be a finite float > 0, got {tau!r}")


def projection_norm_product(q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> Tensor:
    """``G = ||W_Q||_2 ||W_K||_2 ||W_V||_2 ||W_O||_2``, the projection product of a layer.

    Args:
        q: spectral norm(s) of the full W_Q (0-dim, or any shape that broadcasts with the others).
        k: the same for W_K.
        v: the same for W_V.
        o: the same for W_O.

    Returns:
        The broadcast product.

    Example:
        >>> float(projection_norm_product(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.5),
        ...                               torch.tensor(1.0)))
        3.0
    """
    return q * k * v * o


def sensitivity_proxy(theta_max: Tensor, b_bar: Tensor, g: Tensor, tau: float | Tensor = 1.0) -> Tensor:
    """Sensitivity proxy ``S = (theta_max / tau) * b_bar**2 * G`` of one layer (or a batch of layers).

    Args:
        theta_max: largest balanced-mass factor of the layer (use the certified upper bound).
        b_bar: input magnitude, the largest token 2-norm of the attention input.
        g: projection product from :func:`projection_norm_product`.
        tau: attention temperature (logits divided by ``tau``); a float > 0 or a device tensor.

    Returns:
        ``S`` with the broadcast shape of the inputs.

    Raises:
        ValueError: if ``tau`` is a float that is not finite and positive.

    Example:
        >>> float(sensitivity_proxy(torch.tensor(0.5), torch.tensor(2.0), torch.tensor(3.0), tau=2.0))
        3.0
    """
    _check_tau(tau, "sensitivity_proxy")
    return theta_max / tau * b_bar.square() * g


def mha_lipschitz_bound(
    theta_h: Tensor,
    b_bar: Tensor,
    w_o: Tensor,
    w_q_h: Tensor,
    w_k_h: Tensor,
    w_v_h: Tensor,
    head_dim: int,
    tau: float | Tensor = 1.0,
) -> Tensor:
    """Upper bound on the Lipschitz constant of multi-head attention (Theorem 5.1 of the paper).

    ``L <= ||W_O|| sum_h (||W_V,h|| + (theta_h / tau) 2 b_bar**2 / sqrt(d_h) ||W_Q,h|| ||W_K,h|| ||W_V,h||)``

    measured in the block-infinity/RMS norm (the worst token's RMS; since the input and output widths are
    equal this is the same ratio as for the worst token's 2-norm). The bound holds for the Jacobian at the
    input whose attention rows give ``theta_h`` and whose largest token 2-norm is ``b_bar``.

    Args:
        theta_h: ``[..., H]`` largest balanced-mass factor of each head (certified upper bound for a bound).
        b_bar: ``[...]`` largest token 2-norm of the attention input ``U``.
        w_o: ``[...]`` spectral norm of the full W_O.
        w_q_h: ``[..., H]`` spectral norms of the per-head query blocks (``head_slices(w_q, H)``).
        w_k_h: ``[..., H]`` or ``[..., H_kv]`` key-block norms. With grouped-query attention pass the ``H_kv``
            kv-head norms: they are repeated to ``H`` with query head ``h`` using kv head
            ``h // (H // H_kv)`` (the layout of ``repeat_interleave``/HF ``repeat_kv``), or repeat them
            yourself.
        w_v_h: value-block norms, same convention as ``w_k_h``.
        head_dim: ``d_h``.
        tau: attention temperature; a float > 0 or a device tensor.

    Returns:
        ``[...]`` the bound.

    Raises:
        ValueError: if ``head_dim < 1``, a float ``tau`` is not positive, or the head counts do not match.

    Example:
        >>> one = torch.ones(1)
        >>> float(mha_lipschitz_bound(one, torch.tensor(2.0), torch.tensor(1.0), one, one, one, head_dim=4))
        5.0
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"mha_lipschitz_bound: head_dim must be an int >= 1, got {head_dim!r}")
    _check_tau(tau, "mha_lipschitz_bound")
    n_heads = theta_h.shape[-1] if theta_h.ndim else 1
    if w_q_h.ndim == 0 or w_q_h.shape[-1] != n_heads:
        raise ValueError(
            f"mha_lipschitz_bound: w_q_h must end in H={n_heads} heads like theta_h, got shape "
            f"{tuple(w_q_h.shape)}"
        )
    w_k_h = _repeat_kv(w_k_h, n_heads, "w_k_h")
    w_v_h = _repeat_kv(w_v_h, n_heads, "w_v_h")
    phi = 2.0 * b_bar.unsqueeze(-1).square() / math.sqrt(head_dim) * w_q_h * w_k_h * w_v_h
    per_head = w_v_h + theta_h / tau * phi
    return w_o * per_head.sum(-1)


def _repeat_kv(norms: Tensor, n_heads: int, name: str) -> Tensor:
    n_kv = norms.shape[-1] if norms.ndim else 0
    if n_kv == n_heads:
        return norms
    if n_kv < 1 or n_heads % n_kv != 0:
        raise ValueError(
            f"mha_lipschitz_bound: {name} must end in H={n_heads} heads or a divisor H_kv of H "
            f"(grouped-query attention), got shape {tuple(norms.shape)}"
        )
    return norms.repeat_interleave(n_heads // n_kv, dim=-1)


def path_length_scale(n_layers: int, m: int = 4) -> float:
    """Per-map scale ``N**(-1/m)`` keeping a product of ``m`` multiplicative maps bounded over ``N`` layers.

    ``m = 4`` for standard attention (W_Q, W_K, W_V, W_O: DeepNorm-style scaling), ``3`` when W_Q and W_K are
    shared, ``2`` for linear attention (Theorem 6.2).

    Args:
        n_layers: number of layers ``N >= 1``.
        m: number of multiplicative maps in the sensitive path, ``>= 1``.

    Returns:
        The scale as a Python float.

    Raises:
        ValueError: if ``n_layers`` or ``m`` is not a positive int.

    Example:
        >>> path_length_scale(16)
        0.5
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"path_length_scale: n_layers must be an int >= 1, got {n_layers!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(
            f"path_length_scale: m must be an int >= 1 (4 standard attention, 3 shared W_Q=W_K, "
            f"2 linear attention), got {m!r}"
        )
    return float(n_layers ** (-1.0 / m))
