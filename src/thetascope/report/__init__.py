"""thetascope.report."""
