"""TemperatureSchedule against closed forms evaluated independently."""

from __future__ import annotations

import itertools
import math

import pytest

from thetascope.schedules import TemperatureSchedule


@pytest.mark.parametrize("schedule", ["linear", "cosine", "geometric"])
def test_endpoints_and_after_warmup_exact(schedule: str) -> None:
    s = TemperatureSchedule(tau_start=4.0, tau_end=1.0, warmup_steps=10, schedule=schedule)
    assert s(0) == 4.0
    for step in (10, 11, 1000):
        assert s(step) == 1.0  # exactly, not approximately
    values = [s(i) for i in range(11)]
    assert all(a > b for a, b in itertools.pairwise(values))  # strictly decreasing during warmup


def test_closed_forms_midpoint() -> None:
    assert TemperatureSchedule(4.0, 1.0, 10, "linear")(5) == pytest.approx(2.5)
    assert TemperatureSchedule(4.0, 1.0, 10, "cosine")(5) == pytest.approx(2.5)
    assert TemperatureSchedule(4.0, 1.0, 10, "cosine")(2) == pytest.approx(
        1 + 3 * (1 + math.cos(0.2 * math.pi)) / 2
    )
    assert TemperatureSchedule(4.0, 1.0, 10, "geometric")(5) == pytest.approx(2.0)
    # geometric: constant ratio between consecutive steps
    g = TemperatureSchedule(8.0, 1.0, 3, "geometric")
    assert [g(i) for i in range(4)] == pytest.approx([8.0, 4.0, 2.0, 1.0])


def test_zero_warmup_and_increasing() -> None:
    assert TemperatureSchedule(4.0, 1.0, 0)(0) == 1.0
    up = TemperatureSchedule(0.5, 1.0, 4, "linear")
    assert [up(i) for i in range(5)] == pytest.approx([0.5, 0.625, 0.75, 0.875, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tau_start": 0.0}, "tau_start"),
        ({"tau_start": float("nan")}, "tau_start"),
        ({"tau_end": -1.0}, "tau_end"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"schedule": "exp"}, "schedule"),
    ],
)
def test_validation_names_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TemperatureSchedule(**kwargs)


def test_schedule_error_lists_allowed() -> None:
    with pytest.raises(ValueError, match=r"linear.*cosine.*geometric"):
        TemperatureSchedule(schedule="step")


def test_negative_step_rejected() -> None:
    with pytest.raises(ValueError, match="step"):
        TemperatureSchedule()(-1)


def test_state_dict_roundtrip() -> None:
    a = TemperatureSchedule(3.0, 1.5, 7, "cosine")
    b = TemperatureSchedule()
    b.load_state_dict(a.state_dict())
    assert [a(i) for i in range(10)] == [b(i) for i in range(10)]
    assert all(isinstance(v, (int, float, str)) for v in a.state_dict().values())
    with pytest.raises(ValueError, match="schedule"):
        b.load_state_dict({**a.state_dict(), "schedule": "bogus"})
