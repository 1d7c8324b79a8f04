"""Distribution faults under real 2-process DDP (gloo, CPU): one rank fails inside a measurement, or sees a
different set of attention layers. No deadlock (every run is bounded by ``run_ddp``'s timeout), a warning
on the rank that failed, training reaches ``max_steps`` on both ranks, and both ranks agree on what is still
measured."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.ddp import run_ddp
from tests.reliability._util import LM, callbacks, recorded_warnings, token_data, trainer

pytestmark = [pytest.mark.reliability, pytest.mark.ddp]

STEPS = 4
TIMEOUT = 150.0


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected rank-local failure")


def _discover_first_layer_only() -> None:
    """From now on, probes built in this process find only the first attention layer."""
    from thetascope.capture.probe import AttentionProbe

    original = AttentionProbe.__init__

    def first_only(self: AttentionProbe, model: torch.nn.Module, **kwargs: Any) -> None:
        original(self, model, **{**kwargs, "layers": [0]})

    AttentionProbe.__init__ = first_only  # type: ignore[method-assign]


def _fit(rank: int, world_size: int, root: str, fault: str) -> dict[str, Any]:
    import thetascope.callbacks.attention as attention_mod
    import thetascope.functional.gradients as gradients_mod
    import thetascope.functional.sensitivity as sensitivity_mod

    cbs = callbacks(every=1)
    asm, gfm = cbs[1], cbs[2]
    if rank == 1:
        if fault == "measurements":
            # a pre-collective measurement of each monitor, and the post-collective arithmetic of one
            from thetascope.monitors.attention import AttentionMonitor

            AttentionMonitor._spectral = _boom  # type: ignore[method-assign]  # this worker process only
            gradients_mod.gradient_pathology = _boom
            sensitivity_mod.sensitivity_proxy = _boom
        elif fault == "probe":
            attention_mod.shared_probe = _boom
        elif fault == "layers":
            _discover_first_layer_only()
    t = trainer(Path(root), cbs, steps=STEPS, strategy="ddp", devices=world_size)
    with recorded_warnings() as caught:
        t.fit(LM("demo-pre", n_layer=2, d=16, n_head=2), token_data(n=32, seq=8, batch_size=2))
    return {
        "step": t.global_step,
        "warnings": list(caught),
        "asm": dict(asm.last_values),
        "gfm": dict(gfm.last_values),
        "asm_disabled": sorted(asm.guard.disabled),
        "gfm_disabled": sorted(gfm.guard.disabled),
        "callback_metrics": {
            k: float(v) for k, v in t.callback_metrics.items() if k.startswith("stability/")
        },
    }


def _worker(rank: int, world_size: int, root: str, fault: str) -> dict[str, Any]:
    torch.manual_seed(0)
    return _fit(rank, world_size, root, fault)


def _run(tmp_path: Path, fault: str) -> list[dict[str, Any]]:
    ranks = run_ddp(_worker, world_size=2, args=(str(tmp_path), fault), timeout=TIMEOUT)
    assert [r["step"] for r in ranks] == [STEPS, STEPS]
    # values come out of one collective: where both ranks published a value it is the same value
    common = ranks[0]["callback_metrics"].keys() & ranks[1]["callback_metrics"].keys()
    assert common
    assert all(ranks[0]["callback_metrics"][k] == ranks[1]["callback_metrics"][k] for k in common)
    assert ranks[0]["asm_disabled"] == ranks[1]["asm_disabled"]
    assert ranks[0]["gfm_disabled"] == ranks[1]["gfm_disabled"]
    for r in ranks:
        assert all(math.isfinite(v) for v in (*r["asm"].values(), *r["gfm"].values()))
    return ranks


def _warned(r: dict[str, Any], *words: str) -> bool:
    return any(all(w in msg for w in words) for msg in r["warnings"])


def test_one_rank_fails_inside_measurements(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "measurements")
    assert _warned(ranks[1], "spectral", "rank 1")
    assert _warned(ranks[1], "pathology", "rank 1")
    assert _warned(ranks[1], "logging", "rank 1", "injected rank-local failure")
    assert "spectral" in ranks[0]["asm_disabled"]
    assert "pathology" in ranks[0]["gfm_disabled"]
    # what did not fail is still measured, on every rank, to the end
    for r in ranks:
        assert "stability/theta_max/layer_01" in r["asm"]
        assert "stability/grad_norm/global" in r["gfm"]
        assert "stability/grad/early_late_ratio" not in r["gfm"]


def test_one_rank_cannot_build_the_probe(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "probe")
    assert _warned(ranks[1], "probe", "rank 1")
    for r in ranks:
        assert "probe" in r["asm_disabled"]
        assert "stability/grad_norm/global" in r["gfm"]  # the gradient monitor is unaffected


def test_ranks_see_different_numbers_of_attention_layers(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "layers")
    assert any(_warned(r, "attention layer") for r in ranks), [r["warnings"] for r in ranks]
    for r in ranks:
        assert "stability/grad_norm/global" in r["gfm"]
