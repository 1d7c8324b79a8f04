"""Corpus selection and windows, checked on a hand-made source tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thetascope.demo.data import ByteWindows, load_corpus, select_files, stdlib_dir


def _tree(root: Path, n: int) -> None:
    for i in range(n):
        sub = root / ("pkg" if i % 2 else "") / f"m{i:02d}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(f"# module {i}\n".encode() * 3)
    for skipped in ("test", "site-packages", "tests"):
        (root / skipped).mkdir()
        (root / skipped / "zz.py").write_text("SKIPPED\n")
    (root / "notes.txt").write_text("not python\n")


def test_selection_is_sorted_and_skips_tests_and_third_party(tmp_path: Path) -> None:
    _tree(tmp_path, 12)
    files = select_files(tmp_path, max_bytes=10**9)
    rel = [p.relative_to(tmp_path).as_posix() for p in files]
    assert rel == sorted(rel)
    assert len(rel) == 12
    assert not any("zz.py" in r for r in rel)
    # Byte budget: stops once reached.
    size = files[0].stat().st_size
    assert len(select_files(tmp_path, max_bytes=2 * size)) == 2


def test_split_is_by_file(tmp_path: Path) -> None:
    _tree(tmp_path, 12)
    corpus = load_corpus(max_bytes=10**9, val_every=4, root=tmp_path)
    files = select_files(tmp_path, max_bytes=10**9)
    val_files = [f for i, f in enumerate(files) if i % 4 == 3]
    expected_val = b"\n".join(f.read_bytes() for f in val_files)
    assert bytes(corpus.val.tolist()) == expected_val
    # one newline between consecutive files of each part: (n_train - 1) + (n_val - 1) = n - 2 separators
    assert corpus.train.numel() + corpus.val.numel() == sum(f.stat().st_size for f in files) + len(files) - 2
    assert b"SKIPPED" not in bytes(corpus.train.tolist())


def test_too_few_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(RuntimeError, match="source files"):
        load_corpus(root=tmp_path)


def test_stdlib_corpus_is_deterministic_text() -> None:
    a = load_corpus(max_bytes=100_000)
    b = load_corpus(max_bytes=100_000)
    assert a.root == stdlib_dir()
    assert torch.equal(a.train, b.train)
    assert torch.equal(a.val, b.val)
    assert b"def " in bytes(a.train[:100_000].tolist())


def test_windows_are_next_byte_pairs_and_seeded() -> None:
    data = torch.arange(200, dtype=torch.uint8)
    ds = ByteWindows(data, block_size=16, n_samples=5, seed=3)
    again = ByteWindows(data, block_size=16, n_samples=5, seed=3)
    for i in range(5):
        x, y = ds[i]
        assert x.shape == y.shape == (16,)
        assert torch.equal(y, x + 1)  # arange: the target is the next byte
        assert torch.equal(x, again[i][0])
    with pytest.raises(ValueError, match="too short"):
        ByteWindows(data[:10], block_size=16, n_samples=1)
