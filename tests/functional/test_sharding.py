"""Sums of squares and power iteration over FSDP2 shards (real ``fully_shard``, 2 gloo ranks on CPU).

The reference is the same model left unsharded, stepped on the same data in the same process.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.helpers.ddp import run_ddp
from thetascope.functional.sharding import (
    is_dtensor,
    local_rows,
    local_sums_of_squares,
    local_tensor,
    row_range,
    shard_all_reduce,
    shard_group,
    sharded_sums_of_squares,
)


def _model() -> nn.Module:
    # 7 rows (4 + 3 over two ranks), 3 rows (2 + 1), 1 row (rank 1 holds an empty shard)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def _layers(model: nn.Module) -> list[list[Tensor]]:
    return [[m.weight.grad, m.bias.grad] for m in model if isinstance(m, nn.Linear)]


def _backward(model: nn.Module) -> None:
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()


def _distributed_sigma(weight: Tensor, start: int, stop: int, n_iter: int = 200) -> tuple[Tensor, int]:
    """Power iteration on local rows with one all-reduce of the right vector per step (and its count)."""
    calls = 0
    reduce = shard_all_reduce(shard_group([weight]))

    def counted(t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return reduce(t)

    w = local_rows(weight.detach(), start, stop).double()
    v = torch.ones(w.shape[-1], dtype=torch.float64)
    for _ in range(n_iter):
        v = counted(w.mT @ (w @ v))  # W^T W v of the full slice
        v = v / v.norm()
    return counted((w @ v).square().sum()).sqrt(), calls


def _worker(rank: int, world_size: int, mesh_shape: tuple[int, ...]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    reference = _model()
    sharded = copy.deepcopy(reference)
    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for m in sharded:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    _backward(reference)
    _backward(sharded)  # same data on both ranks: the reduced gradient equals the reference's

    grads = _layers(sharded)
    assert all(is_dtensor(g) for g in grads[0])
    expected = torch.stack([sum(g.double().square().sum() for g in layer) for layer in _layers(reference)])

    count = 0
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        full = sharded_sums_of_squares(grads)
    finally:
        dist.all_reduce = original  # type: ignore[assignment]

    # the world-weighted form: one world-wide sum (e.g. inside an all-gather) gives the same values
    local = local_sums_of_squares(grads, world=world_size)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    world_sum = torch.stack(gathered).sum(0)

    weights = [m.weight for m in sharded if isinstance(m, nn.Linear)]
    ref_weights = [m.weight.detach().double() for m in reference if isinstance(m, nn.Linear)]
    sigmas, exact, calls = [], [], []
    # whole matrices, and a row slice that straddles the shard boundary of the 7-row weight
    for w, ref, (a, b) in zip(
        [*weights, weights[0]], [*ref_weights, ref_weights[0]], [(0, 7), (0, 3), (0, 1), (2, 6)]
    ):
        sigma, n = _distributed_sigma(w, a, b)
        sigmas.append(float(sigma))
        exact.append(float(torch.linalg.matrix_norm(ref[a:b], ord=2)))
        calls.append(n)
    # the estimator of thetascope.functional.spectral on the same row shards, with the shard group's reduction
    from thetascope.functional.spectral import SpectralNormEstimator

    est = SpectralNormEstimator(init_iters=60, seed=3)
    mats = {f"w{i}": local_rows(w.detach()) for i, w in enumerate(weights)}
    est_sigmas = [float(s) for s in est(mats, all_reduce=shard_all_reduce(shard_group(weights))).values()]
    return {
        "est_sigmas": est_sigmas,
        "full": full.double(),
        "world_sum": world_sum.double(),
        "expected": expected,
        "count": count,
        "sigmas": sigmas,
        "exact": exact,
        "calls": calls,
        "rows": [row_range(w) for w in weights],
        "local_rows": [tuple(local_tensor(w).shape) for w in weights],
        "padded": [tuple(local_rows(w, 2, 6).shape) for w in weights[:1]],
        "group_size": shard_group(grads[0]).size,
    }


@pytest.mark.ddp
@pytest.mark.parametrize("mesh_shape", [(2,), (2, 1)], ids=["fsdp2", "hsdp-replicate2"])
def test_sharded_sums_of_squares_and_power_iteration_match_unsharded(mesh_shape: tuple[int, ...]) -> None:
    ranks = run_ddp(_worker, world_size=2, args=(mesh_shape,), timeout=120)
    for r in ranks:
        # every layer's sum of squares over the full gradient, identical on both ranks, ONE all-reduce
        torch.testing.assert_close(r["full"], r["expected"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["world_sum"], r["expected"], rtol=1e-5, atol=1e-7)
        assert r["count"] == 1
        # the distributed power iteration matches the SVD of the unsharded weight (and of a row slice)
        assert r["sigmas"] == pytest.approx(r["exact"], rel=1e-6)
        assert r["calls"] == [201] * 4  # one vector all-reduce per step, plus the final norm
        assert r["est_sigmas"] == pytest.approx(r["exact"][:3], rel=1e-5)
    if mesh_shape == (2,):
        assert ranks[0]["group_size"] == 2
        assert [r["rows"] for r in ranks] == [[(0, 4), (0, 2), (0, 1)], [(4, 7), (2, 3), (1, 1)]]
        assert ranks[1]["local_rows"][2] == (0, 3)  # the empty shard
        # rows [2, 6) of the 7-row weight: rank 0 holds 2, rank 1 holds 2; padded shapes agree
        assert ranks[0]["padded"] == ranks[1]["padded"] == [(2, 5)]
    else:
        # HSDP with a replicate dimension of 2 and a shard dimension of 1: the shard group is a single rank
        assert ranks[0]["group_size"] == 1
        assert ranks[0]["rows"] == ranks[1]["rows"] == [(0, 7), (0, 3), (0, 1)]


def test_plain_tensors_are_unsharded() -> None:
    g = [[torch.tensor([3.0, 4.0]), torch.zeros(0)], []]
    assert sharded_sums_of_squares(g).tolist() == [25.0, 0.0]
    assert not shard_group(g[0]).sharded
    w = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(local_rows(w, 1, 3), w[1:3])
    with pytest.raises(ValueError, match="rows"):
        local_rows(w, 2, 5)
