"""Reliability suite settings: one intra-op thread (tiny tensors: threads only add contention on 2 cores)."""

from tests.helpers.threads import single_thread

__all__ = ["single_thread"]
