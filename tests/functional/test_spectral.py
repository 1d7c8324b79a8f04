"""Power iteration and SpectralNormEstimator against exact spectral norms (SVD), whole and row-sharded."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.helpers.sync import SyncSpy
from thetascope.functional import spectral
from thetascope.functional.spectral import SpectralNormEstimator, head_slices, power_iteration


def trained_like(n: int, m: int, k: int, *, seed: int, decay: float = 0.8, rank: int = 8) -> torch.Tensor:
    """Low-rank spectrum decaying by ``decay`` plus Gaussian noise (bulk edge ~0.25 of the top value)."""
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, m, k)
    a = torch.linalg.qr(torch.randn(n, m, rank, generator=g))[0]
    b = torch.linalg.qr(torch.randn(n, k, rank, generator=g))[0]
    s = decay ** torch.arange(rank, dtype=torch.float32)
    noise = torch.randn(n, m, k, generator=g) * (0.25 / (m**0.5 + k**0.5))
    return a @ torch.diag_embed(s.expand(n, rank)) @ b.mT + noise


def exact_norm(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double())[..., 0]


def test_power_iteration_matches_svd_batched() -> None:
    w = trained_like(3, 96, 64, seed=0)
    sigma, u, v = power_iteration(w, n_iter=60, generator=torch.Generator().manual_seed(1))
    exact = exact_norm(w)
    assert sigma.shape == (3,)
    assert u.shape == (3, 96)
    assert v.shape == (3, 64)
    torch.testing.assert_close(sigma.double(), exact, rtol=1e-5, atol=0)
    # u, v are the top singular pair: W v = sigma u
    torch.testing.assert_close(torch.einsum("bmn,bn->bm", w, v), sigma[:, None] * u, rtol=0, atol=1e-4)


def test_power_iteration_is_a_lower_bound_and_batch_equals_loop() -> None:
    w = torch.randn(4, 50, 70, generator=torch.Generator().manual_seed(2))
    v0 = torch.nn.functional.normalize(torch.randn(4, 70, generator=torch.Generator().manual_seed(3)), dim=-1)
    sigma, _, _ = power_iteration(w, v0, n_iter=3)
    assert bool((sigma.double() <= exact_norm(w) * (1 + 1e-6)).all())
    for i in range(4):
        s_i, _, _ = power_iteration(w[i], v0[i], n_iter=3)
        torch.testing.assert_close(s_i, sigma[i], rtol=1e-5, atol=0)


def test_power_iteration_low_precision_computes_in_float32() -> None:
    w = trained_like(2, 64, 64, seed=4).to(torch.bfloat16)
    sigma, u, _ = power_iteration(w, n_iter=50)
    assert sigma.dtype == torch.float32
    assert u.dtype == torch.float32
    torch.testing.assert_close(sigma.double(), exact_norm(w.float()), rtol=1e-4, atol=0)
    s64, _, _ = power_iteration(w.double(), n_iter=5)
    assert s64.dtype == torch.float64


def test_power_iteration_no_grad_and_errors() -> None:
    w = torch.randn(5, 4, requires_grad=True)
    sigma, _, _ = power_iteration(w, n_iter=2)
    assert not sigma.requires_grad
    with pytest.raises(ValueError, match="n_iter must be an int >= 1"):
        power_iteration(w, n_iter=0)
    with pytest.raises(ValueError, match=r"v must have shape \(4,\)"):
        power_iteration(w, torch.ones(5), n_iter=1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        power_iteration(torch.ones(3), n_iter=1)


def test_head_slices_rows_and_columns() -> None:
    w = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    rows = head_slices(w, 3)
    assert rows.shape == (3, 2, 4)
    for h in range(3):
        torch.testing.assert_close(rows[h], w[2 * h : 2 * h + 2])
    cols = head_slices(w, 2, dim=1)
    assert cols.shape == (2, 6, 2)
    for h in range(2):
        torch.testing.assert_close(cols[h], w[:, 2 * h : 2 * h + 2])
    with pytest.raises(ValueError, match=r"cannot split 6 rows .* n_heads=4"):
        head_slices(w, 4)
    with pytest.raises(ValueError, match=r"cannot split 4 columns .* n_heads=3"):
        head_slices(w, 3, dim=1)
    with pytest.raises(ValueError, match="dim must be 0"):
        head_slices(w, 2, dim=2)


def test_estimator_defaults_reach_1e3_cold_and_warm() -> None:
    """Default iteration counts on trained-like spectra: <= 1e-3 relative, cold and after a training drift."""
    ws = trained_like(6, 256, 256, seed=5, decay=0.9)
    est = SpectralNormEstimator()
    names = {f"m{i}": ws[i] for i in range(6)}
    out = est(names)
    ref = {k: float(torch.linalg.matrix_norm(w.double(), 2)) for k, w in names.items()}
    for k in names:
        assert abs(1 - float(out[k]) / ref[k]) <= 1e-3
    g = torch.Generator().manual_seed(6)
    for _ in range(3):  # weights drift slightly between calls, as during training
        names = {k: w + 1e-3 * w.norm() / 256 * torch.randn(w.shape, generator=g) for k, w in names.items()}
        out = est(names)
        for k, w in names.items():
            assert abs(1 - float(out[k]) / float(torch.linalg.matrix_norm(w.double(), 2))) <= 1e-3


def test_estimator_groups_shapes_into_one_batched_call_and_warm_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[list[tuple[int, ...]], tuple[int, ...], int]] = []
    real = spectral._subspace_iteration

    def counting(ws: list[torch.Tensor], v: torch.Tensor, n_iter: int, all_reduce: Any) -> Any:
        calls.append((sorted(tuple(w.shape) for w in ws), tuple(v.shape), n_iter))
        return real(ws, v, n_iter, all_reduce)

    monkeypatch.setattr(spectral, "_subspace_iteration", counting)
    est = SpectralNormEstimator(n_iter=3, init_iters=20, stack=True)
    ws = {
        "a": torch.randn(8, 6),
        "b": torch.randn(8, 6),
        "heads": torch.randn(4, 8, 6),
        "c": torch.randn(6, 8),
        "d": torch.randn(5, 6),  # another row count, same input width: same group, its own product
    }
    out = est(ws)
    # one group per input width: a + b + 4 heads stacked into one product, d beside it; c alone
    assert sorted(calls) == sorted([([(1, 6, 8)], (1, 4, 8), 20), ([(1, 5, 6), (6, 8, 6)], (7, 4, 6), 20)])
    assert out["a"].shape == ()
    assert out["heads"].shape == (4,)
    calls.clear()
    est(ws)
    assert sorted(calls) == sorted([([(1, 6, 8)], (1, 4, 8), 3), ([(1, 5, 6), (6, 8, 6)], (7, 4, 6), 3)])
    # a new key is cold while the others stay warm
    calls.clear()
    est({**ws, "e": torch.randn(8, 6)})
    assert sorted(calls) == sorted(
        [([(1, 6, 8)], (1, 4, 8), 3), ([(1, 5, 6), (6, 8, 6)], (7, 4, 6), 3), ([(1, 8, 6)], (1, 4, 6), 20)]
    )


def test_estimator_stacked_and_looped_agree() -> None:
    ws = {
        "a": torch.randn(8, 6),
        "b": torch.randn(8, 6, dtype=torch.bfloat16).float(),
        "heads": torch.randn(4, 8, 6),
        "c": torch.randn(6, 8),
        "o_heads": head_slices(torch.randn(8, 12), 2, dim=1),  # a non-contiguous view joins the (8, 6) group
    }
    stacked, looped = SpectralNormEstimator(stack=True), SpectralNormEstimator(stack=False)
    for _ in range(2):  # cold, then warm
        out_s, out_l = stacked(ws), looped(ws)
        for k in ws:
            torch.testing.assert_close(out_s[k], out_l[k], rtol=1e-5, atol=0)
            torch.testing.assert_close(out_s[k].double(), exact_norm(ws[k]), rtol=1e-3, atol=0)


def test_estimator_reinitialises_a_key_whose_shape_changes() -> None:
    est = SpectralNormEstimator()
    est({"w": torch.randn(10, 10)})
    w2 = trained_like(1, 12, 7, seed=7)[0]
    out = est({"w": w2})
    torch.testing.assert_close(out["w"].double(), exact_norm(w2), rtol=1e-4, atol=0)
    assert est.state_dict()["vectors"]["w"].shape == (1, 4, 7)  # [H, n_vectors, n]: right vectors


def test_estimator_state_dict_round_trip_gives_identical_results() -> None:
    ws = {"q": torch.randn(4, 16, 16), "o": torch.randn(16, 32)}
    a = SpectralNormEstimator(seed=3)
    a(ws)
    state = a.state_dict()
    assert all(t.device.type == "cpu" for t in state["vectors"].values())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = SpectralNormEstimator(seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    out_a, out_b = a(ws), b(ws)
    for k in ws:
        assert torch.equal(out_a[k], out_b[k])
    with pytest.raises(ValueError, match="expected"):
        b.load_state_dict({"nope": 1})


def test_estimator_drops_a_state_of_the_old_left_vector_layout_with_a_warning() -> None:
    est = SpectralNormEstimator()
    w = trained_like(1, 16, 12, seed=11)[0]
    est({"w": w})
    old = {"vectors": {"w": torch.randn(1, 4, 16)}, "n_iter": 2, "init_iters": 64, "n_vectors": 4}
    with pytest.warns(UserWarning, match="older version"):
        est.load_state_dict(old)
    assert est.keys() == []
    torch.testing.assert_close(est({"w": w})["w"].double(), exact_norm(w), rtol=1e-4, atol=0)


def test_estimator_recovers_after_nonfinite_weights() -> None:
    w = trained_like(1, 32, 32, seed=8)[0]
    est = SpectralNormEstimator()
    est({"w": w})
    bad = w.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(est({"w": bad})["w"])
    torch.testing.assert_close(est({"w": w})["w"].double(), exact_norm(w), rtol=1e-4, atol=0)
    zero = est({"z": torch.zeros(5, 5)})["z"]
    assert float(zero) == 0.0


@pytest.mark.parametrize("stack", [True, False])
def test_estimator_warm_call_has_no_host_sync(stack: bool) -> None:
    ws = {"a": torch.randn(8, 6), "h": torch.randn(2, 8, 6), "b": torch.randn(8, 6, dtype=torch.bfloat16)}
    est = SpectralNormEstimator(stack=stack)
    est(ws)
    with SyncSpy() as spy:
        est(ws)
    assert spy.calls == []


def test_estimator_validation() -> None:
    with pytest.raises(ValueError, match="n_iter must be an int >= 1"):
        SpectralNormEstimator(n_iter=0)
    with pytest.raises(ValueError, match="init_iters must be an int >= 1"):
        SpectralNormEstimator(init_iters=0)
    with pytest.raises(ValueError, match=r"weights\['x'\] must be \[m, n\] or \[H, m, n\]"):
        SpectralNormEstimator()({"x": torch.ones(3)})


def test_top_eigenvalue_and_orthonormalisation_without_solver_status() -> None:
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(5, 4, 30, generator=g, dtype=torch.float64)
    rows[1] = rows[1, :1].expand(4, 30) * torch.tensor([1.0, 0.999, 0.998, 0.5], dtype=torch.float64)[:, None]
    gram = rows @ rows.mT
    torch.testing.assert_close(
        spectral._top_eigenvalue(gram), torch.linalg.eigvalsh(gram)[..., -1], rtol=1e-6, atol=0
    )
    assert float(spectral._top_eigenvalue(torch.zeros(1, 4, 4))[0]) == 0.0
    # rank-deficient (row 1) and zero blocks still give orthonormal rows; row 0 keeps its direction
    basis = torch.linalg.qr(torch.randn(5, 30, 4, generator=g, dtype=torch.float64))[0].mT
    rows[2] = 0.0
    q = spectral._orthonormalize(rows, basis)
    eye = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    torch.testing.assert_close(q @ q.mT, eye, rtol=0, atol=1e-10)
    first = torch.nn.functional.normalize(rows[[0, 3, 4], 0], dim=-1)
    torch.testing.assert_close(q[[0, 3, 4], 0], first, rtol=0, atol=1e-4)


def test_estimator_follows_top_singular_values_that_trade_places() -> None:
    """Training can reorder the top singular values; the vector block keeps the new top direction at hand."""
    g = torch.Generator().manual_seed(10)
    d = 64
    a = torch.linalg.qr(torch.randn(d, 8, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(d, 8, generator=g, dtype=torch.float64))[0]
    noise = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.25 / (2 * d**0.5)
    block, single = SpectralNormEstimator(), SpectralNormEstimator(n_vectors=1)
    worst_block = worst_single = 0.0
    for t in range(21):
        f = t / 20
        s = 0.8 ** torch.arange(8.0, dtype=torch.float64)
        s[0], s[1], s[2] = 1.0 - 0.3 * f, 0.8 + 0.3 * f, 0.7 + 0.35 * f
        w = a @ torch.diag(s) @ b.T + noise
        exact = float(torch.linalg.matrix_norm(w, 2))
        worst_block = max(worst_block, 1 - float(block({"w": w})["w"]) / exact)
        worst_single = max(worst_single, 1 - float(single({"w": w})["w"]) / exact)
    assert worst_block <= 1e-3
    assert worst_single > 1e-2  # one vector lags behind a crossing: why the default keeps a block


def _shard_group(n_ranks: int) -> Any:
    """Run ``fn(rank, all_reduce)`` on ``n_ranks`` threads; ``all_reduce`` sums over them (one fake group)."""
    barrier = threading.Barrier(n_ranks)
    slots: list[torch.Tensor | None] = [None] * n_ranks
    counter = [0]

    def all_reduce_for(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = torch.stack([s for s in slots if s is not None]).sum(0)
            if rank == 0:
                counter[0] += 1
            barrier.wait()
            return total

        return all_reduce

    def run(fn: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], Any]) -> list[Any]:
        results: list[Any] = [None] * n_ranks
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, all_reduce_for(rank))
            except BaseException as err:  # surfaced in the main thread
                errors.append(err)
                barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(n_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    run.counter = counter  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


def test_power_iteration_on_row_shards_matches_svd() -> None:
    w = trained_like(2, 90, 40, seed=12)
    bounds = [0, 37, 38, 90]  # uneven shards, one of a single row
    run = _shard_group(3)
    results = run(lambda r, ar: power_iteration(w[:, bounds[r] : bounds[r + 1]], n_iter=60, all_reduce=ar))
    assert run.counter[0] == 60  # type: ignore[attr-defined]  # one reduction per step
    whole, _, _ = power_iteration(w, n_iter=60, generator=torch.Generator().manual_seed(0))
    for sigma, _, v in results:
        torch.testing.assert_close(sigma.double(), exact_norm(w), rtol=1e-5, atol=0)
        torch.testing.assert_close(v, results[0][2], rtol=0, atol=0)  # replicated
        torch.testing.assert_close(sigma, whole, rtol=1e-5, atol=0)
    u = torch.cat([u for _, u, _ in results], dim=-1)  # the row shards of the left vector
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(2), rtol=1e-5, atol=0)


@pytest.mark.parametrize("stack", [True, False])
def test_estimator_on_row_shards_matches_svd_with_one_reduction_per_step_and_group(stack: bool) -> None:
    g = torch.Generator().manual_seed(13)
    full = {
        "q": trained_like(1, 48, 32, seed=14)[0],
        "heads": trained_like(4, 12, 32, seed=15),
        "o": trained_like(1, 32, 48, seed=16)[0],
        "g": torch.randn(30, 32, generator=g) / 8,
    }
    n_ranks = 2
    cut = {"q": 20, "heads": 5, "o": 16, "g": 29}

    def shard(rank: int) -> dict[str, torch.Tensor]:
        return {k: (w[..., : cut[k], :] if rank == 0 else w[..., cut[k] :, :]) for k, w in full.items()}

    ests = [SpectralNormEstimator(stack=stack) for _ in range(n_ranks)]
    run = _shard_group(n_ranks)
    for call in range(3):
        counter_before = run.counter[0]  # type: ignore[attr-defined]
        outs = run(lambda r, ar: ests[r](shard(r), all_reduce=ar))
        steps = 64 if call == 0 else 2
        # input widths 32 and 48: two groups, one reduction per step each
        assert run.counter[0] - counter_before == 2 * steps  # type: ignore[attr-defined]
        for k, w in full.items():
            torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=0)
            torch.testing.assert_close(outs[0][k].double(), exact_norm(w), rtol=1e-3, atol=0)
        full = {
            k: w + 1e-3 * torch.randn(w.shape, generator=g) * w.norm() / w.numel() ** 0.5
            for k, w in full.items()
        }
    for k in full:
        torch.testing.assert_close(ests[0].state_dict()["vectors"][k], ests[1].state_dict()["vectors"][k])
