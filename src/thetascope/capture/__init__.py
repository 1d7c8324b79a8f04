"""thetascope.capture."""
