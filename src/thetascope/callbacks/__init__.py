"""thetascope.callbacks."""
