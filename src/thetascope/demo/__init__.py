"""The thetascope demo: small GPT-style models on the standard library's source, with all callbacks attached.

Run it with ``thetascope demo`` (or ``make demo``); see :func:`thetascope.demo.train.run_demo`.
"""
