"""thetascope.functional."""
