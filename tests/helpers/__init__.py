"""Shared test helpers (DDP process groups, ...)."""
