"""thetascope.metrics."""
