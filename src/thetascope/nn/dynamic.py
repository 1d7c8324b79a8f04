"""Elementwise, statistics-free replacements for LayerNorm: Dynamic Tanh (DyT) and Dynamic erf (Derf).

Both squash each element with a learnable scalar gain ``alpha`` and apply the usual per-channel affine map
afterwards; neither computes a mean or a variance over the channels. Shapes: any ``[..., *normalized_shape]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NORM_KINDS", "Derf", "DyT", "convert_layernorm", "is_tanh_like"]

#: Values accepted by ``convert_layernorm(model, kind)``.
NORM_KINDS: tuple[str, ...] = ("dyt", "derf")

#: Class names of third-party tanh-like normalisers recognised by :func:`is_tanh_like`.
_TANH_LIKE_NAME = re.compile(r"(dyt|dynamic_?tanh|derf|dynamic_?erf)", re.IGNORECASE)


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"normalized_shape must be a positive int or a tuple of them, got {normalized_shape!r}"
        )
    return shape


class _Dynamic(nn.Module):
    """What :class:`DyT` and :class:`Derf` share: scalar ``alpha``, per-channel ``weight`` and ``bias``."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        alpha_init: float = 0.5,
        elementwise_affine: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)) or not alpha_init > 0:
            raise ValueError(f"alpha_init must be a number > 0, got {alpha_init!r}")
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            if bias:
                self.bias = nn.Parameter(torch.zeros(self.normalized_shape))

    def squash(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def pre_activation(self, x: Tensor) -> Tensor:
        """The argument of the squashing function, ``alpha * x`` (plus ``shift`` for :class:`Derf`)."""
        return self.alpha * x

    def forward(self, x: Tensor) -> Tensor:
        """``[..., *normalized_shape]`` -> same shape."""
        y = self.squash(self.pre_activation(x))
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, alpha_init={self.alpha_init}, "
            f"elementwise_affine={self.weight is not None}, bias={self.bias is not None}"
        )


class DyT(_Dynamic):
    """Dynamic Tanh: ``weight * tanh(alpha * x) + bias`` with a learnable scalar ``alpha`` (init 0.5).

    A drop-in for ``nn.LayerNorm(normalized_shape, elementwise_affine, bias)``: same affine parameters, plus
    one scalar. It has no statistics over channels, so the Jacobian is diagonal and bounded by
    ``alpha * |weight|``; large inputs saturate instead of being rescaled.

    Example:
        >>> m = DyT(4)
        >>> x = torch.tensor([[0.0, 1.0, -2.0, 8.0]])
        >>> torch.allclose(m(x), torch.tanh(0.5 * x))
        True
        >>> sum(p.numel() for p in m.parameters())  # weight, bias and alpha
        9
    """

    def squash(self, x: Tensor) -> Tensor:
        """``tanh``."""
        return torch.tanh(x)


class Derf(_Dynamic):
    """Dynamic erf: ``weight * erf(alpha * x + shift) + bias``, scalars ``alpha`` (init 0.5), ``shift`` (0).

    Same drop-in contract as :class:`DyT`, with two scalars instead of one.

    Example:
        >>> m = Derf(3, alpha_init=1.0)
        >>> x = torch.tensor([0.0, 0.5, -1.0])
        >>> torch.allclose(m(x), torch.erf(x))
        True
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        alpha_init: float = 0.5,
        elementwise_affine: bool = True,
        bias: bool = True,
        shift_init: float = 0.0,
    ) -> None:
        super().__init__(normalized_shape, alpha_init, elementwise_affine, bias)
        self.shift = nn.Parameter(torch.full((1,), float(shift_init)))

    def pre_activation(self, x: Tensor) -> Tensor:
        """``alpha * x + shift``."""
        return self.alpha * x + self.shift

    def squash(self, x: Tensor) -> Tensor:
        """``erf``."""
        return torch.erf(x)


def is_tanh_like(module: nn.Module) -> bool:
    """Whether ``module`` is an elementwise tanh-like normaliser: ours, or a class named like DyT/Derf with a
    parameter ``alpha``.

    Example:
        >>> is_tanh_like(DyT(4)), is_tanh_like(nn.LayerNorm(4))
        (True, False)
    """
    if isinstance(module, _Dynamic):
        return True
    return bool(_TANH_LIKE_NAME.search(type(module).__name__)) and isinstance(
        getattr(module, "alpha", None), Tensor
    )


def convert_layernorm(model: nn.Module, kind: str, alpha_init: float = 0.5) -> nn.Module:
    """Replace every ``nn.LayerNorm`` of ``model`` by :class:`DyT` or :class:`Derf` (``kind``: dyt, derf).

    In place (the model is also returned). Each replacement keeps the LayerNorm's ``normalized_shape``, its
    affine flags and a copy of its ``weight``/``bias`` values, on the same device and dtype. The parameter
    count therefore grows by exactly one per converted LayerNorm for DyT (``alpha``) and two for Derf
    (``alpha``, ``shift``). Parameters shared between modules are not shared any more after conversion (an
    optimizer built before it must be rebuilt).

    Raises:
        ValueError: if ``kind`` is not one of :data:`NORM_KINDS`.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> n0 = sum(p.numel() for p in m.parameters())
        >>> _ = convert_layernorm(m, "derf")
        >>> type(m[1]).__name__, sum(p.numel() for p in m.parameters()) - n0
        ('Derf', 2)
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {list(NORM_KINDS)}, got {kind!r}")
    cls = DyT if kind == "dyt" else Derf
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.LayerNorm):
                continue
            new = cls(
                child.normalized_shape,
                alpha_init=alpha_init,
                elementwise_affine=child.weight is not None,
                bias=child.bias is not None,
            )
            ref = child.weight if child.weight is not None else None
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                if child.weight is not None and new.weight is not None:
                    new.weight.copy_(child.weight)
                if child.bias is not None and new.bias is not None:
                    new.bias.copy_(child.bias)
            new.train(child.training)
            setattr(parent, name, new)
    return model
