"""Norms over sharded parameters (FSDP2 / DTensor, HSDP): local shards, their group, one batched reduction.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every parameter
and its gradient is a ``DTensor`` whose local tensor is a row shard (``Shard(0)``) on one mesh dimension, and
``Replicate()`` on the others (HSDP: a replicate dimension and a shard dimension). Norms of the local tensors
are norms of shards. The exact full-parameter values follow from sums of squares:

* a gradient profile (per-layer sums of squares) is the sum over the shard group of each rank's local sums of
  squares, so all layers go through ONE all-reduce of a ``[G]`` vector (:func:`sharded_sums_of_squares`), or
  through one world-wide sum when :func:`local_sums_of_squares` weights every shard by ``1 / copies`` (the
  form the monitor cores' single all-gather takes);
* a spectral norm needs only ``W^T W v = sum_r W_r^T (W_r v)`` over the row shards ``W_r``: a power iteration
  multiplies the local rows and all-reduces one right-vector per step (:func:`shard_all_reduce`,
  :func:`local_rows`), never gathering the weight.

Nothing here calls ``full_tensor()``; the only collectives are the ones a caller runs through the returned
all-reduce. Plain tensors (no ``DTensor``) are treated as replicated on every rank of the group, which is what
DDP gives. ``Partial`` placements (unreduced values) are refused: their local sums of squares mean nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AllReduce",
    "ShardGroup",
    "is_dtensor",
    "local_rows",
    "local_sums_of_squares",
    "local_tensor",
    "row_range",
    "shard_all_reduce",
    "shard_group",
    "sharded_sums_of_squares",
]

#: Sums a tensor across the ranks of a shard group (returns the summed tensor; every rank calls it).
AllReduce = Callable[[Tensor], Tensor]


def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel parameter or grad).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (no communication), or ``t`` itself.

    Example:
        >>> local_tensor(torch.ones(3)).shape
        torch.Size([3])
    """
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _placement_kind(p: Any) -> str:
    if p.is_shard():
        return "shard"
    if p.is_replicate():
        return "replicate"
    return "partial"


@dataclass(frozen=True)
class ShardGroup:
    """Where a set of sharded tensors must be summed.

    Attributes:
        mesh: the ``DeviceMesh`` every ``DTensor`` lives on (``None``: no ``DTensor``, nothing sharded).
        dims: mesh dimensions some tensor is sharded on (the reduction runs over exactly these).
        group: the process group spanning ``dims``: that mesh dimension's group for one dimension (FSDP2's
            shard dimension, also under HSDP), the default (world) group when several dimensions are sharded
            and the mesh spans the world; ``None`` when nothing is sharded.
        size: number of ranks in ``group`` (1 when nothing is sharded).
    """

    mesh: Any
    dims: tuple[int, ...]
    group: Any
    size: int

    @property
    def sharded(self) -> bool:
        """Whether any tensor is sharded (a reduction is needed)."""
        return bool(self.dims)


def shard_group(tensors: Sequence[Tensor]) -> ShardGroup:
    """The mesh dimensions ``tensors`` are sharded on and the process group that spans them.

    Raises:
        ValueError: ``DTensor``\\ s on different meshes, a ``Partial`` placement, or shards over several mesh
            dimensions of a mesh that does not span the world (no single group to reduce over).

    Example:
        >>> shard_group([torch.zeros(2)]).sharded
        False
    """
    mesh = None
    dims: set[int] = set()
    for t in tensors:
        if not is_dtensor(t):
            continue
        m = t.device_mesh  # type: ignore[attr-defined]
        if mesh is None:
            mesh = m
        elif m != mesh:
            raise ValueError(
                f"sharded tensors live on different device meshes ({mesh} and {m}); one reduction cannot "
                "cover both"
            )
        for dim, p in enumerate(t.placements):  # type: ignore[attr-defined]
            kind = _placement_kind(p)
            if kind == "partial":
                raise ValueError(
                    f"a DTensor has a Partial placement ({p}) on mesh dimension {dim}: its local values are "
                    "unreduced partial sums, not shards, so their norms are not defined"
                )
            if kind == "shard":
                dims.add(dim)
    if mesh is None or not dims:
        return ShardGroup(mesh, (), None, 1)
    ordered = tuple(sorted(dims))
    if len(ordered) == 1:
        group = mesh.get_group(ordered[0])
        return ShardGroup(mesh, ordered, group, int(mesh.size(ordered[0])))
    import torch.distributed as dist

    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"tensors are sharded over mesh dimensions {ordered} of a mesh smaller than the world; no single "
            "process group spans them"
        )
    return ShardGroup(mesh, tuple(range(mesh.ndim)), None, int(mesh.size()))


def _copies(t: Tensor, sg: ShardGroup, world: int | None) -> int:
    """How many ranks of the reduction (``sg.group``, or ``world`` ranks) hold the same values of ``t``."""
    if world is not None:
        if not is_dtensor(t):
            return world
        shards = 1
        for d, p in enumerate(t.placements):  # type: ignore[attr-defined]
            if p.is_shard():
                shards *= int(t.device_mesh.size(d))  # type: ignore[attr-defined]
        return world // shards
    if not sg.sharded:
        return 1
    if not is_dtensor(t):
        return sg.size
    copies = 1
    for dim in sg.dims:
        if not t.placements[dim].is_shard():  # type: ignore[attr-defined]
            copies *= int(sg.mesh.size(dim))
    return copies


def local_sums_of_squares(
    groups: Sequence[Sequence[Tensor]],
    sg: ShardGroup | None = None,
    dtype: torch.dtype = torch.float32,
    world: int | None = None,
) -> Tensor:
    """Per group, the sum over its tensors of ``sum(local**2) / copies``; summed over the ranks it is exact.

    ``copies`` is the number of ranks of the reduction holding the same local values (1 for a shard, the group
    size for a replicated or plain tensor), so adding every rank's vector gives each full tensor's sum of
    squares exactly once. Empty shards (an uneven split leaves a rank no rows) contribute 0. One
    ``torch._foreach_norm`` over all local tensors; no host sync, no communication.

    Args:
        groups: ``G`` groups of tensors (e.g. the gradients of each layer); a group may be empty.
        sg: from :func:`shard_group` over all the tensors (computed here when ``None``).
        dtype: accumulation dtype.
        world: ``None``: the vector is to be summed over ``sg.group`` (:func:`sharded_sums_of_squares`). An
            int: it is to be summed over all ``world`` ranks (a mesh spanning the world), e.g. inside the one
            all-gather a monitor already runs for its other values; replicas across the HSDP replicate
            dimension and plain tensors are weighted down accordingly.

    Returns:
        ``[G]`` sums of squares on the first tensor's device (CPU when there is none).

    Example:
        >>> local_sums_of_squares([[torch.tensor([3.0, 4.0])], []]).tolist()
        [25.0, 0.0]
    """
    flat = [t for g in groups for t in g]
    if sg is None:
        sg = shard_group(flat)
    device = flat[0].device if flat else torch.device("cpu")
    out = torch.zeros(len(groups), dtype=dtype, device=device)
    locals_ = [local_tensor(t) for t in flat]
    nonempty = [i for i, t in enumerate(locals_) if t.numel() > 0]
    if not nonempty:
        return out
    # [n] one fused kernel over every non-empty local tensor; squares are accumulated in ``dtype``
    norms = torch._foreach_norm([locals_[i].to(dtype) for i in nonempty])
    # weights as Python scalars: no host-to-device copy (this also runs at every optimizer step)
    weighted = torch._foreach_mul(
        torch._foreach_mul(norms, norms), [1.0 / _copies(flat[i], sg, world) for i in nonempty]
    )
    sq = torch.stack(list(weighted)).to(device=device, dtype=dtype)
    if len(groups) == 1:
        return sq.sum().reshape(1)
    owner = []
    for gi, g in enumerate(groups):
        owner.extend([gi] * len(g))
    index = torch.tensor([owner[i] for i in nonempty], dtype=torch.long, device=device)
    return out.index_add_(0, index, sq)


def shard_all_reduce(sg: ShardGroup) -> AllReduce:
    """The sum over ``sg.group`` (the identity when nothing is sharded or ``torch.distributed`` is off).

    Example:
        >>> shard_all_reduce(shard_group([torch.zeros(1)]))(torch.ones(2)).tolist()
        [1.0, 1.0]
    """

    def reduce(t: Tensor) -> Tensor:
        import torch.distributed as dist

        if not sg.sharded or not (dist.is_available() and dist.is_initialized()):
            return t
        out = t.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=sg.group)
        return out

    return reduce


def sharded_sums_of_squares(groups: Sequence[Sequence[Tensor]], dtype: torch.dtype = torch.float32) -> Tensor:
    """Per group, the full tensors' sum of squares, identical on every rank: ONE all-reduce for all groups.

    The local, copy-weighted sums of :func:`local_sums_of_squares` go through a single all-reduce over the
    shard group (FSDP2: the shard mesh dimension; HSDP: the shard dimension only, replicas already agree).
    Never ``full_tensor()``, never a gather of gradients. Take ``sqrt`` for norms.

    Example:
        >>> sharded_sums_of_squares([[torch.tensor([3.0, 4.0])], [torch.ones(4)]]).tolist()
        [25.0, 4.0]
    """
    flat = [t for g in groups for t in g]
    sg = shard_group(flat)
    return shard_all_reduce(sg)(local_sums_of_squares(groups, sg, dtype))


def _row_shard(weight: Tensor) -> tuple[int, int, int] | None:
    """``(mesh_dim, coordinate, group_size)`` of a DTensor row-sharded (``Shard(0)``) on one mesh dim."""
    if not is_dtensor(weight):
        return None
    shard_dims = []
    for dim, p in enumerate(weight.placements):  # type: ignore[attr-defined]
        kind = _placement_kind(p)
        if kind == "partial":
            raise ValueError(f"a weight with a Partial placement ({p}) has no row shards")
        if kind == "shard":
            if p.dim not in (0, -weight.ndim):
                raise ValueError(
                    f"weight of shape {tuple(weight.shape)} is sharded along tensor dimension {p.dim}; only "
                    "row shards (dimension 0, what FSDP2 uses) are supported"
                )
            shard_dims.append(dim)
    if not shard_dims:
        return None
    if len(shard_dims) > 1:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} is row-sharded over several mesh dimensions {shard_dims} "
            "(tensor parallel with FSDP); not supported"
        )
    mesh = weight.device_mesh  # type: ignore[attr-defined]
    dim = shard_dims[0]
    coord = mesh.get_local_rank(dim)
    return dim, int(coord), int(mesh.size(dim))


def _chunk(n: int, size: int, coord: int) -> tuple[int, int]:
    # torch.chunk semantics (what Shard uses): ceil(n / size) rows per rank, the last ranks get fewer or none
    step = math.ceil(n / size) if n else 0
    start = min(coord * step, n)
    return start, min(start + step, n)


def row_range(weight: Tensor) -> tuple[int, int]:
    """The global rows ``[start, stop)`` this rank's shard of ``weight`` holds (all rows if not sharded).

    Example:
        >>> row_range(torch.zeros(5, 3))
        (0, 5)
    """
    info = _row_shard(weight)
    n = int(weight.shape[0])
    if info is None:
        return 0, n
    _, coord, size = info
    start, stop = _chunk(n, size, coord)
    local_n = int(local_tensor(weight).shape[0])
    if stop - start != local_n:
        raise ValueError(
            f"the local shard of a weight of shape {tuple(weight.shape)} has {local_n} rows, not the "
            f"{stop - start} an even chunking gives; an unknown sharding layout"
        )
    return start, stop


def local_rows(weight: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """This rank's part of global rows ``[start, stop)`` of a row-sharded ``weight``, zero-padded to a size
    every rank shares.

    The padding makes the returned shape the same on every rank of the shard group (so batched power
    iterations group identically everywhere and run the same collectives); zero rows change neither
    ``W^T W`` nor any singular value. A plain tensor (not sharded) is returned as ``weight[start:stop]``.
    Sum ``local.mT @ (local @ v)`` over the group (:func:`shard_all_reduce`) to get ``W^T W v`` of the full
    slice. A view of the local shard when no padding is needed; no communication.

    Args:
        weight: ``[m, n]`` matrix, a ``DTensor`` with ``Shard(0)`` on one mesh dimension, or a plain tensor.
        start: first global row of the slice.
        stop: one past the last global row (``m`` when ``None``).

    Returns:
        ``[k, n]`` local rows, ``k = max`` over the group's ranks of their overlap with ``[start, stop)``.

    Example:
        >>> local_rows(torch.arange(6.0).reshape(3, 2), 1, 3).tolist()
        [[2.0, 3.0], [4.0, 5.0]]
    """
    m = int(weight.shape[0])
    stop = m if stop is None else stop
    if not 0 <= start <= stop <= m:
        raise ValueError(f"rows [{start}, {stop}) are not inside a weight with {m} rows")
    info = _row_shard(weight)
    if info is None:
        return weight[start:stop]
    size = info[2]
    lo, hi = row_range(weight)
    local = local_tensor(weight)
    width = 0
    for c in range(size):
        c_lo, c_hi = _chunk(m, size, c)
        width = max(width, min(c_hi, stop) - max(c_lo, start))
    a, b = max(lo, start), min(hi, stop)
    rows = local[a - lo : b - lo] if b > a else local[:0]
    if rows.shape[0] == width:
        return rows
    pad = rows.new_zeros((width - rows.shape[0], *rows.shape[1:]))
    return torch.cat([rows, pad], dim=0)
