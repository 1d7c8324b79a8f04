"""A real text corpus that every Python installation carries: the standard library's own source files.

Bytes are tokens (vocabulary 256), so no tokenizer and no download are needed. File selection is deterministic
(sorted relative paths, test suites and third-party packages excluded) and the train/val split is by file, so
validation text is never seen in training.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

# Directories skipped: third-party code and the (huge, repetitive) test suites.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library sources.

    Example:
        >>> stdlib_dir().is_dir()
        True
    """
    return Path(sysconfig.get_paths()["stdlib"])


def select_files(root: Path, max_bytes: int) -> list[Path]:
    """The ``.py`` files under ``root`` in sorted relative-path order, until ``max_bytes`` are collected.

    Args:
        root: directory to scan.
        max_bytes: stop once the selected files hold at least this many bytes.

    Returns:
        Paths in a deterministic order (sorted by their POSIX path relative to ``root``).

    Example:
        >>> files = select_files(stdlib_dir(), max_bytes=10_000)
        >>> len(files) >= 1
        True
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune: never descend into them
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    candidates = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    chosen: list[Path] = []
    total = 0
    for path in candidates:
        if total >= max_bytes:
            break
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size == 0:
            continue
        chosen.append(path)
        total += size
    return chosen


@dataclass(frozen=True)
class Corpus:
    """Train and validation byte streams (``uint8`` tensors) and where they came from."""

    train: Tensor
    val: Tensor
    root: Path
    n_files: int

    def describe(self) -> str:
        """One line for the console."""
        return (
            f"{self.n_files} files from {self.root}: {self.train.numel():,} train bytes, "
            f"{self.val.numel():,} val bytes"
        )


def load_corpus(max_bytes: int = 2_000_000, val_every: int = 10, root: Path | None = None) -> Corpus:
    """Read the standard-library corpus; every ``val_every``-th selected file goes to validation.

    Args:
        max_bytes: approximate corpus size.
        val_every: file ``i`` (in selection order) is a validation file when
            ``i % val_every == val_every - 1``.
        root: directory to read instead of the standard library (for tests).

    Raises:
        RuntimeError: when fewer than 4 files or too few bytes are found (e.g. a Python without sources).

    Example:
        >>> c = load_corpus(max_bytes=200_000)
        >>> c.train.dtype, c.val.numel() > 0
        (torch.uint8, True)
    """
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    root = root if root is not None else stdlib_dir()
    files = select_files(root, max_bytes)
    if len(files) < 4:
        raise RuntimeError(
            f"found only {len(files)} .py source files under {root}; the demo needs the standard library's "
            "source files (some minimal Python builds ship only .pyc)"
        )
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    for i, path in enumerate(files):
        text = path.read_bytes()
        (val_parts if i % val_every == val_every - 1 else train_parts).append(text)
    train = torch.frombuffer(bytearray(b"\n".join(train_parts)), dtype=torch.uint8)
    val = torch.frombuffer(bytearray(b"\n".join(val_parts)), dtype=torch.uint8)
    return Corpus(train=train, val=val, root=root, n_files=len(files))


class ByteWindows(Dataset[tuple[Tensor, Tensor]]):
    """Random fixed-length windows of a byte stream as (input, next-byte target) pairs.

    The window offsets are drawn once from a seeded generator, so sample ``i`` is the same on every run.

    Example:
        >>> ds = ByteWindows(torch.arange(100, dtype=torch.uint8), block_size=8, n_samples=4, seed=0)
        >>> x, y = ds[0]
        >>> bool((y[:-1] == x[1:]).all()), x.dtype
        (True, torch.int64)
    """

    def __init__(self, data: Tensor, block_size: int, n_samples: int, seed: int = 0) -> None:
        if data.numel() <= block_size + 1:
            raise ValueError(f"stream of {data.numel()} bytes is too short for block_size {block_size}")
        self.data = data
        self.block_size = block_size
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, data.numel() - block_size - 1, (n_samples,), generator=gen)

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = int(self.offsets[i])
        chunk = self.data[start : start + self.block_size + 1].long()  # [L + 1]
        return chunk[:-1], chunk[1:]
