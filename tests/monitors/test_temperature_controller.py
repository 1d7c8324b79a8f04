"""TemperatureController from a plain loop: tau per step on the shared probe, unhooked after warmup."""

from __future__ import annotations

import pytest
import torch

from thetascope.capture.registry import shared_probe
from thetascope.demo.model import GPT, GPTConfig
from thetascope.monitors import TemperatureController
from thetascope.schedules import TemperatureSchedule


def _gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))


def test_steps_follow_the_schedule_on_the_shared_probe() -> None:
    model = _gpt()
    reference = _gpt()
    reference.load_state_dict(model.state_dict())
    sched = TemperatureSchedule(3.0, 1.0, 4, "linear")
    temp = TemperatureController(model, sched)
    assert temp.probe is shared_probe(model)  # the probe the attention monitor measures
    x = torch.randint(0, 32, (2, 8))
    seen = []
    for step in range(6):
        seen.append(temp.step(step))
        assert temp.tau == pytest.approx(sched(step))
        with torch.no_grad():
            same = torch.equal(model(x), reference(x))
        assert same == (sched(step) == 1.0), step  # tau != 1 changes the logits; tau == 1 is bitwise plain
    assert seen == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0, 1.0])
    assert temp.probe is not None
    assert not temp.probe.is_installed


def test_remove_and_state_round_trip() -> None:
    model = _gpt()
    temp = TemperatureController(model, TemperatureSchedule(4.0, 1.0, 10, "cosine"))
    temp.step(3)
    assert temp.tau > 1.0
    temp.remove()
    assert temp.tau == 1.0
    other = TemperatureController(None, TemperatureSchedule(2.0, 1.0, 5))
    assert other.tau == 1.0
    assert other.step(0) == 2.0
    other.load_state_dict(temp.state_dict())
    assert other.schedule.state_dict() == temp.schedule.state_dict()
    with pytest.raises(KeyError):
        other.load_state_dict({"schedule": {"tau_start": 3.0}})
    assert other.schedule.tau_start == 4.0  # a bad layout changed nothing
    with pytest.raises(ValueError, match="schedule"):
        TemperatureController(model, "linear")  # type: ignore[arg-type]
