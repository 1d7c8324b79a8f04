"""thetascope.schedules: framework-free attention-temperature schedules (step -> tau)."""

from thetascope.schedules.temperature import SCHEDULES, TemperatureSchedule

__all__ = ["SCHEDULES", "TemperatureSchedule"]
