"""Fixtures for the monitor-core tests: one intra-op thread."""

from tests.helpers.threads import single_thread

__all__ = ["single_thread"]
