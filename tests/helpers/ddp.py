"""Run a function in real ``torch.distributed`` processes (gloo, CPU) from a test.

Example::

    def _worker(rank: int, world_size: int, scale: float) -> float:
        t = torch.tensor([rank * scale])
        torch.distributed.all_reduce(t)
        return float(t)

    def test_sum() -> None:
        assert run_ddp(_worker, world_size=2, args=(2.0,)) == [2.0, 2.0]

``fn`` must be importable by the child processes (a module-level function of a test module or of ``src``),
because the workers are started with the ``spawn`` method. It is called as ``fn(rank, world_size, *args)``
inside an initialised gloo process group; ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and ``NODE_RANK`` are set as well, so a Lightning
``Trainer(strategy="ddp", accelerator="cpu", devices=world_size)`` created inside ``fn`` joins the existing
group instead of launching processes of its own. Its return value (anything ``torch.save`` can write) comes
back in rank order. An exception in a worker is re-raised in the test process with the worker's traceback
attached as its cause; a worker that hangs past ``timeout`` is killed and a ``TimeoutError`` is raised.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DDPWorkerError", "find_free_port", "run_ddp"]


class DDPWorkerError(RuntimeError):
    """A worker failed; the message holds its rank and traceback."""


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of the re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    port: int,
    out_dir: str,
    timeout: float,
    threads: int,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    # Workers share the test machine's cores; oversubscription makes gloo tests crawl.
    torch.set_num_threads(threads)
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"result_{rank}.pt")
    except BaseException as exc:
        (out / f"traceback_{rank}.txt").write_text(traceback.format_exc())
        # An unpicklable exception still reports its traceback text.
        with contextlib.suppress(Exception):
            (out / f"exception_{rank}.pkl").write_bytes(pickle.dumps(exc))
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _raise_worker_failure(out: Path, world_size: int, fallback: BaseException) -> None:
    """Re-raise the first failing rank's exception (same type when picklable) with its traceback as cause."""
    # The rank torch saw fail first goes first: the other ranks usually fail only as a consequence (a peer
    # closed the gloo connection), and their tracebacks would hide the real one.
    first = getattr(fallback, "error_index", None)
    order = sorted(range(world_size), key=lambda r: (r != first, r))
    for rank in order:
        tb_file = out / f"traceback_{rank}.txt"
        if not tb_file.exists():
            continue
        text = f"DDP worker rank {rank} of {world_size} raised:\n{tb_file.read_text()}"
        exc: BaseException | None = None
        exc_file = out / f"exception_{rank}.pkl"
        if exc_file.exists():
            try:
                exc = pickle.loads(exc_file.read_bytes())
            except Exception:
                exc = None
        if isinstance(exc, Exception):
            raise exc from _RemoteTraceback(text)
        raise DDPWorkerError(text) from fallback
    raise DDPWorkerError(f"a DDP worker died without a Python traceback: {fallback}") from fallback


def run_ddp(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
    threads_per_worker: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; return results by rank.

    Args:
        fn: Module-level (picklable) function, called once per rank inside an initialised process group.
        world_size: Number of processes.
        args: Extra positional arguments (picklable) passed to every rank.
        timeout: Seconds for the whole run (also the process-group timeout); workers still alive are killed.
        threads_per_worker: ``torch.set_num_threads`` in each worker.

    Returns:
        ``[result_rank0, result_rank1, ...]``.

    Raises:
        TimeoutError: The workers did not finish within ``timeout`` seconds.
        DDPWorkerError: A worker died without a Python exception (segfault, kill) or raised an unpicklable
            one.
        Exception: Whatever a worker raised, re-raised with the worker's traceback as ``__cause__``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="thetascope_ddp_") as tmp:
        out = Path(tmp)
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, tuple(args), find_free_port(), tmp, timeout, threads_per_worker),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            # join() returns True once all ranks exited cleanly and raises as soon as one fails (it then
            # terminates the others, which would otherwise block in a collective).
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DDP workers did not finish within {timeout} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            _raise_worker_failure(out, world_size, err)
        finally:
            for proc in context.processes:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
                    if proc.is_alive():
                        proc.kill()
                        proc.join()
        results = []
        for rank in range(world_size):
            path = out / f"result_{rank}.pt"
            if not path.exists():
                raise DDPWorkerError(f"DDP worker rank {rank} exited without writing a result")
            results.append(torch.load(path, weights_only=False))
        return results
