"""Configuration faults: every invalid argument of every public class and function gets a ``ValueError`` that
names the argument and says what is allowed. One table, one row per (target, argument, bad value)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from thetascope.callbacks import AttentionSensitivityMonitor, GradientFlowMonitor, TemperatureWarmup
from thetascope.capture import AttentionProbe
from thetascope.functional import (
    SpectralNormEstimator,
    SpikeDetector,
    averaged_partial_jacobian_norm,
    balanced_mass_factor,
    gradient_pathology,
    head_slices,
    mha_lipschitz_bound,
    path_length_scale,
    power_iteration,
    sensitivity_proxy,
    softmax_jacobian_norm,
)
from thetascope.metrics import BalancedMassFactor, GradientFlow, SensitivityProxy
from thetascope.schedules import TemperatureSchedule

pytestmark = pytest.mark.reliability

# Words that say what is allowed ("must be an int >= 1", "one of [...]", "in (0, 1)" ...).
_ALLOWED_HINTS = (
    "must",
    "one of",
    "expected",
    "allowed",
    ">=",
    "in [",
    "in (",
    "out of range",
    "found ",
    "pass ",
    "cannot",
    "has ",
    "negative",
)

NAN, INF = math.nan, math.inf
_BAD_INT = (0, -1, 1.5, True, "2", None)  # None only where None is not a documented choice
_BAD_POS_FLOAT = (0, -1.0, NAN, INF, "4", True)
_BAD_FLAG = ("yes", 1, None)


def _model() -> torch.nn.Module:
    from tests.capture.conftest import NanoGPT

    return NanoGPT(n_embd=16, n_head=2, n_layer=2, block_size=8)


def _rows(target: str, factory: Callable[..., Any], arg: str, values: tuple[Any, ...]) -> list[Any]:
    return [pytest.param(factory, arg, v, id=f"{target}-{arg}={v!r}") for v in values]


_TABLE: list[Any] = [
    # --- callbacks
    *_rows("ASM", AttentionSensitivityMonitor, "every_n_steps", _BAD_INT),
    *_rows("ASM", AttentionSensitivityMonitor, "rows_per_head", _BAD_INT),
    *_rows("ASM", AttentionSensitivityMonitor, "exact_top", (0, 21, 2.0, True)),
    *_rows("ASM", AttentionSensitivityMonitor, "layers", ("first", [-1], [1.5], 3, [True])),
    *_rows("ASM", AttentionSensitivityMonitor, "batch_size", (0, -2, 1.5, True)),
    *_rows("ASM", AttentionSensitivityMonitor, "power_iters", (0, 1.5, True)),
    *_rows("ASM", AttentionSensitivityMonitor, "prefix", (3, None)),
    *_rows("ASM", AttentionSensitivityMonitor, "prog_bar", _BAD_FLAG),
    *_rows("ASM", AttentionSensitivityMonitor, "log_heatmap", _BAD_FLAG),
    *_rows("ASM", AttentionSensitivityMonitor, "strict", _BAD_FLAG),
    *_rows("GFM", GradientFlowMonitor, "every_n_steps", _BAD_INT),
    *_rows("GFM", GradientFlowMonitor, "spike_action", ("halt", None, "WARN")),
    *_rows("GFM", GradientFlowMonitor, "spike_window", (2, 0, 3.5, True)),
    *_rows("GFM", GradientFlowMonitor, "spike_threshold", _BAD_POS_FLOAT),
    *_rows("GFM", GradientFlowMonitor, "vanishing_fraction", (0.0, 1.0, -0.1, NAN, "0.1", True)),
    *_rows("GFM", GradientFlowMonitor, "layers", ("first", [-1], 2)),
    *_rows("GFM", GradientFlowMonitor, "prefix", (3,)),
    *_rows("GFM", GradientFlowMonitor, "log_heatmap", _BAD_FLAG),
    *_rows("GFM", GradientFlowMonitor, "strict", _BAD_FLAG),
    *_rows("TW", TemperatureWarmup, "tau_start", _BAD_POS_FLOAT),
    *_rows("TW", TemperatureWarmup, "tau_end", _BAD_POS_FLOAT),
    *_rows("TW", TemperatureWarmup, "warmup_steps", (-1, 1.5, True, "10")),
    *_rows("TW", TemperatureWarmup, "schedule", ("exp", None, "Linear")),
    *_rows("TW", TemperatureWarmup, "log", _BAD_FLAG),
    *_rows("TW", TemperatureWarmup, "prefix", (3,)),
    # --- schedules
    *_rows("TS", TemperatureSchedule, "tau_start", _BAD_POS_FLOAT),
    *_rows("TS", TemperatureSchedule, "tau_end", _BAD_POS_FLOAT),
    *_rows("TS", TemperatureSchedule, "warmup_steps", (-1, 1.5, True)),
    *_rows("TS", TemperatureSchedule, "schedule", ("exp", None)),
    # --- capture
    *_rows("Probe", lambda **kw: AttentionProbe(_model(), **kw), "rows_per_head", (0, -1, 1.5, True, "8")),
    *_rows("Probe", lambda **kw: AttentionProbe(_model(), **kw), "batch_size", (0, 1.5, True)),
    *_rows("Probe", lambda **kw: AttentionProbe(_model(), **kw), "exact_top", (0, 21, True)),
    *_rows("Probe", lambda **kw: AttentionProbe(_model(), **kw), "heads", (0, [-1], [], [2], "all")),
    *_rows("Probe", lambda **kw: AttentionProbe(_model(), **kw), "layers", ([5], ["nope"], [-3])),
    *_rows("Probe", lambda **kw: AttentionProbe(_model(), **kw), "seed", ("x", 1.5)),
    *_rows(
        "Probe", lambda **kw: AttentionProbe(_model()).set_temperature(**kw), "tau", (0.0, -1.0, NAN, INF)
    ),
    # --- functional
    *_rows("Spike", SpikeDetector, "window", (2, 0, 3.0, True)),
    *_rows("Spike", SpikeDetector, "threshold", _BAD_POS_FLOAT),
    *_rows("Spike", SpikeDetector, "min_history", (0, 101, 1.5, True)),
    *_rows("SNE", SpectralNormEstimator, "n_iter", (0, 1.5, True)),
    *_rows("SNE", SpectralNormEstimator, "init_iters", (0, 1.5, True)),
    *_rows("SNE", SpectralNormEstimator, "eps", (0.0, -1.0, NAN, "1e-12")),
    *_rows("SNE", SpectralNormEstimator, "seed", ("x", 1.5)),
    *_rows(
        "bmf", lambda **kw: balanced_mass_factor(torch.full((2, 4), 0.25), **kw), "exact_top", (0, 21, True)
    ),
    *_rows(
        "bmf",
        lambda **kw: balanced_mass_factor(**kw),
        "probs",
        (
            torch.tensor(0.5),
            torch.ones(2, 3, dtype=torch.long),
            torch.tensor([[0.5, 0.7]]),
            torch.tensor([[-0.5, 1.5]]),
        ),
    ),
    *_rows("power_iteration", lambda **kw: power_iteration(torch.eye(3), **kw), "n_iter", (0, True)),
    *_rows("head_slices", lambda **kw: head_slices(torch.eye(4), **kw), "n_heads", (0, 3, True)),
    *_rows("head_slices", lambda **kw: head_slices(torch.eye(4), 2, **kw), "dim", (2, -1)),
    *_rows(
        "gradient_pathology",
        lambda **kw: gradient_pathology(torch.ones(3), **kw),
        "vanishing_fraction",
        (0.0, 1.0, NAN),
    ),
    *_rows(
        "sensitivity_proxy",
        lambda **kw: sensitivity_proxy(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), **kw),
        "tau",
        (0.0, -1.0, NAN),
    ),
    *_rows(
        "softmax_jacobian_norm",
        lambda **kw: softmax_jacobian_norm(torch.full((4,), 0.25), **kw),
        "tau",
        (0.0, -2.0, NAN),
    ),
    *_rows(
        "mha_lipschitz_bound",
        lambda **kw: mha_lipschitz_bound(
            torch.ones(2),
            torch.tensor(1.0),
            torch.tensor(1.0),
            torch.ones(2),
            torch.ones(2),
            torch.ones(2),
            **kw,
        ),
        "head_dim",
        (0, 1.5, True),
    ),
    *_rows("path_length_scale", lambda **kw: path_length_scale(**kw), "n_layers", (0, -1, 1.5)),
    *_rows("path_length_scale", lambda **kw: path_length_scale(4, **kw), "m", (0, 1.5)),
    *_rows(
        "apjn",
        lambda **kw: averaged_partial_jacobian_norm(lambda h: h, torch.ones(2, 2), **kw),
        "n_probes",
        (0, 1.5, True),
    ),
    # --- metrics
    *_rows("BMF", BalancedMassFactor, "exact_top", (0, 21, True)),
    *_rows("BMF", BalancedMassFactor, "threshold", (-0.1, 1.1, NAN, "0.9")),
    *_rows("BMF", BalancedMassFactor, "n_bins", (0, 1.5, True)),
    *_rows("BMF", BalancedMassFactor, "validate", ("yes", 2)),
    *_rows("GF", GradientFlow, "vanishing_fraction", (0.0, 1.0, NAN, "0.1")),
    *_rows("GF", GradientFlow, "num_layers", (0, 1.5, True)),
    *_rows("SP", SensitivityProxy, "num_layers", (0, 1.5, True)),
]


@pytest.mark.parametrize(("factory", "arg", "value"), _TABLE)
def test_invalid_argument_is_named(factory: Callable[..., Any], arg: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        factory(**{arg: value})
    message = str(info.value)
    assert arg in message, f"the message does not name {arg!r}: {message}"
    assert any(h in message for h in _ALLOWED_HINTS), f"the message does not say what is allowed: {message}"


def test_layers_beyond_the_model_fail_at_the_start_of_fit(tmp_path: Path) -> None:
    """A layer index the model does not have can only be checked once the model is known: a clear ValueError
    naming ``layers`` before any training step, not a silent NaN or a crash deep in a measurement."""
    from tests.reliability._util import LM, token_data, trainer

    for cb in (AttentionSensitivityMonitor(every_n_steps=1, layers=[7]), GradientFlowMonitor(layers=[7])):
        t = trainer(tmp_path, [cb], steps=2, logger=None)
        with pytest.raises(ValueError, match="layers"):
            t.fit(LM("demo-pre", n_layer=2, d=16, n_head=2), token_data(n=8, seq=8, batch_size=2))
        assert t.global_step == 0, type(cb).__name__


def test_model_without_attention(tmp_path: Path) -> None:
    """AttentionProbe says what it searched; the monitor warns and keeps training; the warmup refuses."""
    with pytest.raises(ValueError, match="no attention module"):
        AttentionProbe(torch.nn.Sequential(torch.nn.Linear(2, 2)))
