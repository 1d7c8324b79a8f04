"""Real 2-process DDP (gloo, CPU): every percentile the attention core logs equals one process's value."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.ddp import run_ddp
from tests.monitors.test_attention_core import _batch, _model
from thetascope.functional.theta import ThetaBounds
from thetascope.functional.theta_stats import _theta_compute, _theta_update, quantile_key
from thetascope.monitors._collective import PackedValues, distributed_all_gather, reduce_packed
from thetascope.monitors.attention import THETA_QUANTILES

pytestmark = pytest.mark.ddp

QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.9)


def _core_values(part: slice, all_gather: Any) -> dict[str, float]:
    from thetascope.monitors.attention import AttentionMonitor

    model = _model()
    mon = AttentionMonitor(model, rows_per_head=64, strict=True)  # 64 >= L: every row, on every rank
    with mon.capture():
        model(_batch()[part])
    return mon.reduce(mon.measure(), all_gather)


def _rows(seed: int = 3) -> ThetaBounds:
    """Brackets of 999 rows spread over [0, 1], with some NaN rows (fully masked) among them."""
    gen = torch.Generator().manual_seed(seed)
    lower = torch.rand(999, generator=gen) ** 0.3
    lower[::37] = float("nan")
    return ThetaBounds(lower, (lower + 1e-4 * torch.rand(999, generator=gen)).clamp_max(1.0))


def _stats_values(rows: ThetaBounds, all_gather: Any) -> dict[str, float]:
    packed = PackedValues()
    for name, value in _theta_update(rows)._asdict().items():
        packed.add(name, value.float(), "max" if name.startswith("max") else "sum")
    out = packed.unpack(reduce_packed(packed, all_gather))
    return {k: float(v) for k, v in _theta_compute(*out.values(), quantiles=QUANTILES).items()}


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    gather = distributed_all_gather()
    rows = _rows()
    half = ThetaBounds(rows.lower[rank::world_size], rows.upper[rank::world_size])  # uneven split, NaNs too
    per_rank = slice(2 * rank, 2 * rank + 2)
    return {"core": _core_values(per_rank, gather), "stats": _stats_values(half, gather)}


def test_every_percentile_equals_the_single_process_value() -> None:
    ranks = run_ddp(_worker, world_size=2, timeout=180)
    from thetascope.monitors._collective import local_all_gather

    single_core = _core_values(slice(0, 4), local_all_gather)
    single_stats = _stats_values(_rows(), local_all_gather)

    # the functional statistics over fixed rows: bit-for-bit the same numbers, on both ranks
    for q in QUANTILES:
        key = quantile_key(q)
        assert ranks[0]["stats"][key] == ranks[1]["stats"][key] == single_stats[key], key
    # and each is within one bin width (1e-3) of numpy's exact percentile of the midpoints
    mids = (0.5 * (_rows().lower + _rows().upper)).double().numpy()
    mids = mids[np.isfinite(mids)]
    for q in QUANTILES:
        assert single_stats[quantile_key(q)] == pytest.approx(np.quantile(mids, q), abs=1e-3 + 1e-6)

    # the core on a real model: 2 ranks x 2 sequences against 1 process x 4 sequences
    pct_keys = [k for k in single_core if any(f"theta_{quantile_key(q)}/" in k for q in THETA_QUANTILES)]
    assert len(pct_keys) == 2  # theta_p10 of both layers
    for key in pct_keys:
        assert ranks[0]["core"][key] == ranks[1]["core"][key]
        assert ranks[0]["core"][key] == pytest.approx(single_core[key], abs=1e-6), key
    assert ranks[0]["core"]["stability/theta_max"] == pytest.approx(
        single_core["stability/theta_max"], abs=1e-6
    )
