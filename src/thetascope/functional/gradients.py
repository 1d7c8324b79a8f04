"""Per-layer gradient norms and gradient-flow pathology statistics, on device and without host syncs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, overload

import torch
from torch import Tensor
from torch.nn import Parameter

__all__ = [
    "LAYER_PATTERN",
    "STACKS",
    "global_grad_norm",
    "grad_norms_by_group",
    "grad_sq_norms_by_group",
    "gradient_pathology",
    "group_parameters_by_block",
    "group_parameters_by_layer",
    "layer_index_of",
    "layer_stack_of",
]

#: Matches a known layer-container name followed by a numeric index as whole dotted components:
#: ``h`` (GPT-2, BLOOM, Falcon: ``transformer.h.3.``), ``layers``/``layer`` (Llama ``model.layers.3.``,
#: BERT ``encoder.layer.3.``, plain ``layers.3.``), ``blocks``/``block`` (nanoGPT/timm ``blocks.3.``, T5
#: ``block.3.``) and ``resblocks`` (CLIP). Leftmost match wins: ``blocks.2.mlp.layers.0.weight`` is layer 2.
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:h|layers?|blocks?|resblocks)\.(\d+)(?=\.|$)")


def layer_index_of(name: str) -> int | None:
    """Layer index of a parameter name: the first number after a known container (see :data:`LAYER_PATTERN`).

    Encoder-decoder models number both stacks from 0 (T5's ``encoder.block.0`` and ``decoder.block.0``), so
    the index alone does not tell their layers apart: :func:`layer_stack_of` gives the stack and
    :func:`group_parameters_by_block` groups by both.

    Args:
        name: a dotted parameter name as from ``model.named_parameters()``.

    Returns:
        The index, or ``None`` when the name is not inside a recognised layer container (embeddings, heads).

    Example:
        >>> layer_index_of("transformer.h.3.attn.c_attn.weight"), layer_index_of("model.layers.11.mlp.w")
        (3, 11)
        >>> layer_index_of("transformer.wte.weight") is None
        True
    """
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


#: Stacks told apart by :func:`group_parameters_by_block`, in depth order (input side first).
STACKS: tuple[str, ...] = ("encoder", "decoder")


def layer_stack_of(name: str) -> str | None:
    """The stack (``"encoder"`` or ``"decoder"``) that holds the layer of a parameter name, if any.

    The stack is the last dotted component before the layer container that is, or ends with, ``encoder`` or
    ``decoder`` (``model.decoder.layers.3`` in BART, ``decoder.block.3`` in T5, ``decoder.layers.3`` in
    ``torch.nn.Transformer``).

    Example:
        >>> layer_stack_of("model.decoder.layers.3.fc1.weight"), layer_stack_of("encoder.block.0.layer.0.w")
        ('decoder', 'encoder')
        >>> layer_stack_of("transformer.h.3.attn.c_attn.weight") is None
        True
    """
    match = LAYER_PATTERN.search(name)
    if match is None:
        return None
    for part in reversed(name[: match.start()].split(".")):
        for stack in STACKS:
            if part.endswith(stack):
                return stack
    return None


def group_parameters_by_block(
    named_parameters: Iterable[tuple[str, Parameter]],
) -> tuple[list[tuple[str | None, int]], list[list[Parameter]], list[Parameter]]:
    """Group trainable parameters by ``(stack, layer index)``, keeping encoder and decoder layers apart.

    The stack is given only when the model has layers in more than one stack (see :func:`layer_stack_of`):
    a single-stack model (GPT, Llama, or BERT, whose layers live in ``bert.encoder``) gets ``None`` for every
    layer, so its groups are those of :func:`group_parameters_by_layer`. Blocks are sorted in depth order:
    encoder layers, then decoder layers. Frozen and repeated (tied) parameters are handled as there.

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.

    Returns:
        ``(blocks, groups, other)``: the sorted ``(stack, index)`` pairs, the parameters of each (same order),
        and the parameters outside any layer.

    Example:
        >>> model = torch.nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=1,
        ...                              dim_feedforward=8, batch_first=True)
        >>> blocks, groups, other = group_parameters_by_block(model.named_parameters())
        >>> blocks
        [('encoder', 0), ('encoder', 1), ('decoder', 0)]
    """
    named = list(named_parameters)
    stacks = {layer_stack_of(n) for n, p in named if p.requires_grad and layer_index_of(n) is not None}
    split = len(stacks) > 1
    order: dict[str | None, int] = {None: 0, **{s: i for i, s in enumerate(STACKS)}}
    keyed: dict[tuple[str | None, int], int] = {}

    def block_of(name: str) -> int | None:
        idx = layer_index_of(name)
        if idx is None:
            return None
        return keyed.setdefault((layer_stack_of(name) if split else None, idx), len(keyed))

    ids, groups, other = group_parameters_by_layer(named, layer_of=block_of)
    block_at = {v: k for k, v in keyed.items()}
    pairs = sorted(
        ((block_at[i], g) for i, g in zip(ids, groups)), key=lambda kg: (order[kg[0][0]], kg[0][1])
    )
    return [k for k, _ in pairs], [g for _, g in pairs], other


def group_parameters_by_layer(
    named_parameters: Iterable[tuple[str, Parameter]],
    layer_of: Callable[[str], int | None] = layer_index_of,
) -> tuple[list[int], list[list[Parameter]], list[Parameter]]:
    """Group trainable parameters by layer index.

    Parameters with ``requires_grad=False`` are left out; a parameter object seen twice (tied weights listed
    under two names) is kept once, under its first name.

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        layer_of: maps a name to a layer index or ``None``.

    Returns:
        ``(layer_ids, groups, other)``: sorted distinct layer indices, the parameters of each (same
        order), and the parameters outside any layer.

    Example:
        >>> model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 1),
        ...                              "head": torch.nn.Linear(2, 1)})
        >>> ids, groups, other = group_parameters_by_layer(model.named_parameters())
        >>> ids, [len(g) for g in groups], len(other)
        ([0], [2], 2)
    """
    by_layer: dict[int, list[Parameter]] = {}
    other: list[Parameter] = []
    seen: set[int] = set()
    for name, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        idx = layer_of(name)
        if idx is None:
            other.append(param)
        else:
            by_layer.setdefault(idx, []).append(param)
    layer_ids = sorted(by_layer)
    return layer_ids, [by_layer[i] for i in layer_ids], other


def _tensor_norms(grads: list[Tensor]) -> list[Tensor]:
    # float32 results: fp16 norms of large gradients would overflow when squared. float64 gradients (a model
    # cast with .double()) are reduced in float64, since torch refuses a narrowing dtype=, then cast.
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    norms: list[Tensor] | None = None
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is not None:
        try:
            norms = list(foreach_norm(grads, 2, dtype=dtype))
        except (TypeError, RuntimeError):  # older torch without dtype=, or an unsupported layout
            norms = None
    if norms is None:
        norms = [torch.linalg.vector_norm(g, dtype=dtype) for g in grads]
    return norms if dtype == torch.float32 else [n.float() for n in norms]


def global_grad_norm(params: Iterable[Tensor]) -> Tensor | None:
    """``sqrt(sum of squares)`` of all gradients of ``params`` from ONE fused ``torch._foreach_norm``.

    The per-step path (spike detection): unlike :func:`grad_sq_norms_by_group` it needs no group index
    tensor, whose creation from a Python list would be a synchronous host-to-device copy on CUDA. No host
    synchronisation.

    Returns:
        A 0-dim float32 tensor on the gradients' device, or ``None`` when no parameter has a gradient.

    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        >>> a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
        >>> float(global_grad_norm([a, b]))
        5.0
    """
    # under no_grad rather than a detach() per gradient: one call instead of one per parameter on the per-step
    # path (a gradient that requires grad, after create_graph=True, then records nothing either)
    with torch.no_grad():
        grads = [g for p in params if (g := p.grad) is not None]
        if not grads:
            return None
        norms = _tensor_norms(grads)
        try:  # one device (the usual case): no per-tensor copy call on the per-step path
            stacked = torch.stack(norms)
        except RuntimeError:  # parameters spread over devices: gather the norms on the first one
            device = grads[0].device
            stacked = torch.stack([n.to(device, non_blocking=True) for n in norms])
        return torch.linalg.vector_norm(stacked)


def grad_sq_norms_by_group(
    groups: Sequence[Sequence[Tensor]], *, other: Sequence[Tensor] = ()
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of squared gradient entries of each parameter group and of everything, from one fused norm.

    Sums of squares, not norms, so that shards of one parameter held by different ranks can be added before
    the square root. Per-tensor norms come from one ``torch._foreach_norm`` (float32) and are squared and
    scatter-added into their group. Parameters whose ``.grad`` is ``None`` are skipped (a group without any
    gradient reads 0); a NaN or Inf gradient makes its group and the total NaN or Inf. No host sync.

    Args:
        groups: parameter groups, e.g. from :func:`group_parameters_by_block`.
        other: parameters counted in the total only (embeddings, heads).

    Returns:
        ``(per_group_sq [N], total_sq [], nonfinite [])``: float32 on the gradients' device (the first
        gradient's, CPU if none), and the number of gradient tensors whose norm is not finite (long).

    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        >>> a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
        >>> per_group, total, _ = grad_sq_norms_by_group([[a], [b]])
        >>> per_group.tolist(), float(total)
        ([9.0, 16.0], 25.0)
    """
    grads: list[Tensor] = []
    index: list[int] = []
    for gi, group in enumerate(groups):
        for p in group:
            if p.grad is not None:
                grads.append(p.grad.detach())
                index.append(gi)
    for p in other:
        if p.grad is not None:
            grads.append(p.grad.detach())
            index.append(len(groups))  # an extra slot, dropped below
    n_groups = len(groups)
    device = grads[0].device if grads else torch.device("cpu")
    if not grads:
        zero = torch.zeros((), device=device)
        return torch.zeros(n_groups, device=device), zero, torch.zeros((), dtype=torch.long, device=device)
    norms = torch.stack([n.to(device, non_blocking=True) for n in _tensor_norms(grads)])
    sq = norms.square()
    idx = torch.tensor(index, device=device)
    per_sq = torch.zeros(n_groups + 1, device=device).index_add_(0, idx, sq)[:n_groups]
    return per_sq, sq.sum(), (~torch.isfinite(norms)).sum()


@overload
def grad_norms_by_group(
    groups: Sequence[Sequence[Tensor]],
    *,
    other: Sequence[Tensor] = ...,
    return_nonfinite: Literal[False] = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def grad_norms_by_group(
    groups: Sequence[Sequence[Tensor]],
    *,
    other: Sequence[Tensor] = ...,
    return_nonfinite: Literal[True],
) -> tuple[Tensor, Tensor, Tensor]: ...


def grad_norms_by_group(
    groups: Sequence[Sequence[Tensor]],
    *,
    other: Sequence[Tensor] = (),
    return_nonfinite: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Gradient 2-norm of each parameter group and of everything, from one ``torch._foreach_norm``.

    The square roots of :func:`grad_sq_norms_by_group`: a group's norm is the norm of its concatenated
    gradients, never a sum of norms. A group holding a NaN or Inf gradient reads NaN or Inf, and so does the
    global norm. No host synchronisation.

    Args:
        groups: parameter groups, e.g. from :func:`group_parameters_by_layer`.
        other: parameters counted in the global norm only (embeddings, heads).
        return_nonfinite: also return the number of gradient tensors whose norm is not finite.

    Returns:
        ``(per_group [N], global_norm [])`` float32 on the gradients' device (the first gradient's, CPU if
        none); plus a 0-dim long count when ``return_nonfinite``.

    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        >>> a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
        >>> per_group, total = grad_norms_by_group([[a], [b]])
        >>> per_group.tolist(), float(total)
        ([3.0, 4.0], 5.0)
    """
    per_sq, total_sq, nonfinite = grad_sq_norms_by_group(groups, other=other)
    if return_nonfinite:
        return per_sq.sqrt(), total_sq.sqrt(), nonfinite
    return per_sq.sqrt(), total_sq.sqrt()


def gradient_pathology(layer_norms: Tensor, vanishing_fraction: float = 0.01) -> dict[str, Tensor]:
    """Summary statistics of a depth profile of gradient norms (no host synchronisation).

    Args:
        layer_norms: ``[N]`` gradient norm per layer in depth order (input side first).
        vanishing_fraction: a layer "vanishes" when its norm is below this fraction of the largest, in (0, 1).

    Returns:
        0-dim float32 tensors (``vanishing_layers`` and ``argmin_layer`` are long):

        * ``early_late_ratio``: mean of the first third of layers over the mean of the last third (at least
          one layer each). Below 1 when early layers starve (post-LN), about 1 or above for pre-LN.
        * ``log_slope``: least-squares slope of ``log(norm)`` against the layer position ``0..N-1`` (norms are
          floored at the smallest positive float so unused layers do not give ``-inf``).
        * ``vanishing_layers``: number of layers below ``vanishing_fraction * max``.
        * ``min_max_ratio``: smallest over largest norm.
        * ``argmin_layer``: position (0..N-1) of the smallest norm.

        Non-finite norms propagate (NaN statistics), so a bad step is visible.

    Raises:
        ValueError: if ``layer_norms`` is not a non-empty 1-D tensor or ``vanishing_fraction`` is outside
            (0, 1).

    Example:
        >>> stats = gradient_pathology(torch.tensor([0.01, 0.1, 1.0]))
        >>> round(float(stats["early_late_ratio"]), 3), round(float(stats["log_slope"]), 3)
        (0.01, 2.303)
    """
    if layer_norms.ndim != 1 or layer_norms.numel() == 0:
        raise ValueError(
            f"gradient_pathology: layer_norms must be a non-empty 1-D tensor [N], got shape "
            f"{tuple(layer_norms.shape)}"
        )
    if not (isinstance(vanishing_fraction, (int, float)) and 0 < vanishing_fraction < 1):
        raise ValueError(
            f"gradient_pathology: vanishing_fraction must be in (0, 1), got {vanishing_fraction!r}"
        )
    x = layer_norms.detach()
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    n = x.numel()
    third = max(1, n // 3)
    early = x[:third].mean()
    late = x[n - third :].mean()
    pos = torch.arange(n, dtype=x.dtype, device=x.device)
    logs = x.clamp_min(torch.finfo(x.dtype).tiny).log()
    pc = pos - pos.mean()
    denom = pc.square().sum()
    slope = (
        (pc * (logs - logs.mean())).sum() / denom
        if n > 1
        else torch.zeros((), dtype=x.dtype, device=x.device)
    )
    mx = x.max()
    return {
        "early_late_ratio": early / late,
        "log_slope": slope,
        "vanishing_layers": (x < vanishing_fraction * mx).sum(),
        "min_max_ratio": x.min() / mx,
        "argmin_layer": x.argmin(),
    }
