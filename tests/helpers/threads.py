"""An autouse fixture that runs a test directory's tests on one intra-op thread.

Import it into a ``conftest.py``: small tensors gain nothing from threads, and on a loaded 2-core machine
intra-op threads spin against each other (about 10x slower).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Set one torch intra-op thread for the test, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
