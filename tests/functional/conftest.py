"""Fixtures for the pure-math tests: one intra-op thread."""

from tests.helpers.threads import single_thread

__all__ = ["single_thread"]
