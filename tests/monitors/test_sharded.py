"""The communication of one measurement under FSDP2, counted (``CommDebugMode`` sees c10d and DTensor ops).

One collective for the gradient profile; a number of vector all-reduces per power-iteration step that does not
depend on how many layers (parameters) the model has; nothing when not measuring. Cores only, no Trainer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from tests.helpers.ddp import run_ddp


def _counts(fn: Any) -> tuple[Any, dict[str, int]]:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        out = fn()
    return out, {str(k).split(".")[-1]: int(v) for k, v in comm.get_comm_counts().items()}


def _one_model(n_layer: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from thetascope.demo.model import GPT, GPTConfig
    from thetascope.monitors import AttentionMonitor, GradientFlowCore
    from thetascope.monitors._collective import distributed_all_gather

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=4, n_embd=32))
    att, grad = AttentionMonitor(model, rows_per_head=8), GradientFlowCore(model)
    mesh = init_device_mesh("cpu", (2,))
    for block in model.transformer["h"]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    grad.bind(model)  # the parameters are DTensors now
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gather = distributed_all_gather()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {}
    for call in range(2):  # cold (init_iters steps) then warm (n_iter steps)
        with att.capture():
            loss = model(x).float().square().mean()
        vals, out[f"att_measure_{call}"] = _counts(att.measure)
        _, out[f"att_reduce_{call}"] = _counts(lambda vals=vals: att.reduce(vals, gather))
        loss.backward()
        _, out[f"observe_{call}"] = _counts(lambda: grad.observe_step(opt))
        g, out[f"grad_measure_{call}"] = _counts(lambda: grad.measure(opt))
        logged, out[f"grad_reduce_{call}"] = _counts(lambda g=g: grad.reduce(g, gather))
        opt.zero_grad()
    if n_layer == 2:
        # a failure on rank 1 only, inside the measured forward's weight read of layer 1: no deadlock, the
        # layer is switched off on both ranks, layer 0 is still measured
        import torch.distributed as dist

        rec = att.probe.layers[1]
        if dist.get_rank() == 1:

            def broken() -> Any:
                raise RuntimeError("rank-local failure")

            rec._weights_fn = broken
        with pytest.warns(RuntimeWarning) if dist.get_rank() == 1 else contextlib.nullcontext():
            with att.capture():
                model(x)
            logged = att.reduce(att.measure(), gather)
        out["after_failure"] = sorted(k for k in logged if "proj_norm/layer" in k)
        out["disabled"] = sorted(att.guard.disabled)
    out["iters"] = (att.estimator.init_iters, att.estimator.n_iter)
    out["n_params"] = len(list(model.parameters()))
    out["logged_layers"] = sorted(k for k in logged if "grad_norm/layer" in k)
    return out


def _worker(rank: int, world_size: int) -> dict[int, dict[str, Any]]:
    return {n: _one_model(n) for n in (2, 4)}


@pytest.mark.ddp
def test_collectives_of_one_measurement_are_counted() -> None:
    ranks = run_ddp(_worker, world_size=2, timeout=200)
    two, four = ranks[0][2], ranks[0][4]
    assert ranks[1][2]["after_failure"] == two["after_failure"]
    assert ranks[1][2]["disabled"] == two["disabled"]
    assert four["n_params"] > two["n_params"]
    assert len(four["logged_layers"]) == 4
    init_iters, n_iter = two["iters"]
    for r in (two, four):
        # gradient profile: nothing while measuring, ONE all-gather for every layer and the global norm
        assert r["grad_measure_0"] == r["grad_measure_1"] == {}
        assert r["grad_reduce_0"] == r["grad_reduce_1"] == {"allgather_": 1}
        # the every-step spike detector: one scalar all-reduce of the global sum of squares
        assert r["observe_0"] == r["observe_1"] == {"allreduce_": 1}
        # spectral norms: one all-reduce of right vectors per power-iteration step (one shape group here:
        # every projection of the demo GPT reads a 32-wide input), however many layers; then one all-gather
        assert r["att_measure_0"] == {"allreduce_": init_iters}
        assert r["att_measure_1"] == {"allreduce_": n_iter}
        assert r["att_reduce_0"] == r["att_reduce_1"] == {"allgather_": 1}
    assert two["after_failure"] == ["stability/proj_norm/layer_00"]
    assert two["disabled"] == ["layer_01"]
