"""The monitor cores under FSDP2: which model is sharded, and the projection weights as row shards.

FSDP2 holds the full parameters of a block only while that block runs its forward; afterwards every parameter
is a row-sharded ``DTensor`` again. :class:`ShardedProjections` therefore reads each attention layer's
projection matrices (through its adapter, exactly as in an unsharded model) in a forward hook of the measured
forward, and keeps only this rank's share of the rows of every matrix: ``1 / group size`` of them, a copy.
The spectral norms then come from :class:`~thetascope.functional.spectral.SpectralNormEstimator` with the
shard group's all-reduce: each power-iteration step multiplies the local rows and sums one block of right
vectors across the group (``W^T W V = sum_r W_r^T W_r V`` for any split of the rows), so no rank ever
gathers or holds a weight outside FSDP's own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from thetascope.functional.sharding import AllReduce, ShardGroup, is_dtensor, shard_all_reduce, shard_group

__all__ = ["ShardedProjections", "model_shard_group", "projection_mats"]


def model_shard_group(model: nn.Module) -> ShardGroup | None:
    """The shard group of ``model``'s ``DTensor`` parameters, or ``None`` when nothing is sharded.

    Raises:
        ValueError: the parameters are sharded in a way the monitors cannot reduce (see
            :func:`~thetascope.functional.sharding.shard_group`).
    """
    params = [p for p in model.parameters() if is_dtensor(p)]
    if not params:
        return None
    sg = shard_group(params)
    return sg if sg.sharded else None


def projection_mats(w: Any, name: str) -> dict[str, Tensor]:
    """The matrices whose spectral norms a layer reports, by key: whole ``q, k, v, o`` and per-head
    ``qh, kh, vh`` stacks (``[H, d_h, d_in]``), from a
    :class:`~thetascope.capture.records.ProjectionWeights`."""
    ph = w.per_head()
    return {
        f"{name}/q": w.w_q,
        f"{name}/k": w.w_k,
        f"{name}/v": w.w_v,
        f"{name}/o": w.w_o,
        f"{name}/qh": ph["q"],
        f"{name}/kh": ph["k"],
        f"{name}/vh": ph["v"],
    }


def _my_rows(m: Tensor, coord: int, size: int) -> Tensor:
    """This rank's contiguous share of the rows (dim -2) of ``m``, copied (it outlives the full weights)."""
    rows = m.shape[-2]
    step = -(-rows // size)
    start = min(coord * step, rows)
    return m[..., start : min(start + step, rows), :].detach().clone()


class ShardedProjections:
    """Row shards of every measured layer's projection matrices, taken during the measured forward.

    Args:
        sg: the model's shard group (:func:`model_shard_group`).

    Use :meth:`capture` around the measured forward (with the records whose modules to hook and the key of
    each), then :meth:`mats` for the keys the estimator should see, and :attr:`all_reduce` as its reduction.
    """

    def __init__(self, sg: ShardGroup) -> None:
        import torch.distributed as dist

        self.sg = sg
        self.all_reduce: AllReduce = shard_all_reduce(sg)
        self.size = sg.size
        self.coord = dist.get_rank(sg.group) if sg.group is not None else dist.get_rank()
        self._shards: dict[str, dict[str, Tensor]] = {}
        self._shapes: dict[str, dict[str, tuple[torch.Size, torch.dtype, torch.device]]] = {}
        #: per layer: (n_heads, n_kv_heads, head_dim, shared_qk), read while the weights were full
        self.meta: dict[str, tuple[int, int, int, bool]] = {}
        #: layers whose hook failed in the last measured forward, with the error
        self.errors: dict[str, BaseException] = {}

    @contextlib.contextmanager
    def capture(self, layers: Sequence[tuple[str, Any]]) -> Iterator[None]:
        """Hook the attention modules (``record.adapter.module``) of ``(name, record)`` for one forward."""
        self._shards = {}
        self.errors = {}
        handles = []
        for name, rec in layers:
            if not rec.has_weights:  # no projections found: G_l, S_l and the bound are missing for it
                continue

            def hook(_mod: nn.Module, _args: Any, _out: Any, name: str = name, rec: Any = rec) -> None:
                try:
                    with torch.no_grad():
                        w = rec.weights()
                        mats = projection_mats(w, name)
                        shards = {k: _my_rows(m, self.coord, self.size) for k, m in mats.items()}
                except Exception as err:  # never break the forward; the monitor reports it for this layer
                    self.errors[name] = err
                    return
                self._shards[name] = shards
                self._shapes[name] = {k: (m.shape, m.dtype, m.device) for k, m in mats.items()}
                self.meta[name] = (int(w.n_heads), int(w.n_kv_heads), int(w.head_dim), bool(w.shared_qk))

            handles.append(rec.adapter.module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def mats(self, names: Sequence[str]) -> dict[str, Tensor]:
        """This rank's row shards for the layers ``names`` (the same keys and widths on every rank).

        A layer whose hook failed on this rank (see :attr:`errors`) gets zero rows of the shapes it had
        before, so every rank still runs the same all-reduces (no deadlock); the caller fails that layer,
        which drops its values of this step on every rank. Not supported: a layer that never ran on this rank
        in any measured forward while it ran on others (``KeyError`` here, before the collectives), and a
        layer skipped on one rank only (its norms would come from the other ranks' rows).
        """
        out: dict[str, Tensor] = {}
        for name in names:
            shards = self._shards.get(name)
            if shards is None:
                shards = {
                    k: torch.zeros((*shape[:-2], 0, shape[-1]), dtype=dtype, device=device)
                    for k, (shape, dtype, device) in self._shapes[name].items()
                }
            out.update(shards)
        return out

    @contextlib.contextmanager
    def weights_from_meta(self, layers: Sequence[tuple[str, Any]]) -> Iterator[None]:
        """While inside, ``record.weights()`` of these layers gives shapes and head counts only (no tensors).

        Outside the forward an FSDP2 weight is a ``DTensor`` shard: reading it through an adapter's slicing
        would redistribute (gather) it. The head counts, head width and whether W_Q and W_K are shared were
        read in the measured forward and are served from there (empty tensors, shared where they were).
        """
        from thetascope.capture.records import ProjectionWeights

        saved = []
        for name, rec in layers:
            meta = self.meta.get(name)
            if meta is None:
                continue
            h, hkv, dh, shared = meta
            # distinct one-element tensors (empty ones would all share data_ptr 0 and read as shared)
            q, k, v, o = (torch.zeros(1) for _ in range(4))
            pw = ProjectionWeights(q, q if shared else k, v, o, h, hkv, dh)
            saved.append((rec, rec._weights_fn))
            rec._weights_fn = lambda pw=pw: pw
        try:
            yield
        finally:
            for rec, fn in saved:
                rec._weights_fn = fn

    def seen(self, name: str) -> bool:
        """Whether the last measured forward gave this rank the row shards of layer ``name``."""
        return name in self._shards
