"""thetascope.schedules."""
