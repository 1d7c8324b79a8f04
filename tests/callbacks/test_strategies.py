"""Which strategies the callbacks accept: FSDP1, DeepSpeed and tensor parallelism are refused at setup."""

from __future__ import annotations

import types

import pytest

from thetascope.callbacks._lightning import refuse_sharded


def _fake(strategy: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(strategy=strategy, global_rank=0, world_size=2)


def test_fsdp1_refused_naming_fsdp2() -> None:
    # Lightning runs FSDPStrategy on CUDA only (the Trainer raises for accelerator="cpu"), so the setup check
    # is called with the real strategy object
    from lightning.pytorch.strategies import FSDPStrategy

    for owner in ("GradientFlowMonitor", "AttentionSensitivityMonitor"):
        with pytest.raises(
            RuntimeError, match=r"FSDPStrategy \(FSDP1\).*FlatParameter.*ModelParallelStrategy"
        ):
            refuse_sharded(_fake(FSDPStrategy()), owner, "gradient", fsdp2=True)  # type: ignore[arg-type]


def test_deepspeed_and_tensor_parallel_refused() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    deepspeed = type("DeepSpeedStrategy", (), {})()  # the real one needs the deepspeed package
    with pytest.raises(RuntimeError, match=r"DeepSpeedStrategy: ZeRO.*FSDP2"):
        refuse_sharded(_fake(deepspeed), "GradientFlowMonitor", "gradient", fsdp2=True)  # type: ignore[arg-type]
    tp = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match=r"tensor_parallel_size=2.*slices"):
        refuse_sharded(_fake(tp), "AttentionSensitivityMonitor", "weight", fsdp2=True)  # type: ignore[arg-type]


def test_fsdp2_accepted_only_by_callers_that_reduce_shards() -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    fsdp2 = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    refuse_sharded(_fake(fsdp2), "GradientFlowMonitor", "gradient", fsdp2=True)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="does not reduce shards"):
        refuse_sharded(_fake(fsdp2), "X", "gradient")  # type: ignore[arg-type]
    refuse_sharded(_fake(DDPStrategy()), "X", "gradient")  # type: ignore[arg-type]
