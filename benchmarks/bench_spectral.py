"""Batched power iteration against exact spectral norms (SVD), and accuracy against iteration count.

Part 1: all Q/K/V/O matrices of GPT-2 774M (36 layers x 4 matrices of 1280x1280) on CUDA; on CPU only
``CPU_LAYERS`` layers (the SVD takes ~1 s per matrix there). Both sides see the same matrices.
Part 2: relative error ``1 - sigma_est / sigma_exact`` against iteration count, cold start (random vector) and
warm start (vector of the previous call, after the weights drifted), on random Gaussian and trained-like
(low rank + noise) matrices.
"""

from __future__ import annotations

import torch

from benchmarks._timing import time_call
from thetascope.functional.spectral import (
    DEFAULT_INIT_ITERS,
    DEFAULT_N_VECTORS,
    DEFAULT_POWER_ITERS,
    SpectralNormEstimator,
    power_iteration,
)

CPU_LAYERS = 2
D = 1280


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trained_like(
    n: int, d: int, *, rank: int = 8, decay: float = 0.8, noise_edge: float = 0.25, gen: torch.Generator
) -> torch.Tensor:
    """``n`` matrices ``d x d``: rank-``rank`` spectrum ``decay**i`` plus Gaussian noise whose bulk edge is
    ``noise_edge`` times the top singular value."""
    a = torch.linalg.qr(torch.randn(n, d, rank, generator=gen))[0]
    b = torch.linalg.qr(torch.randn(n, d, rank, generator=gen))[0]
    s = decay ** torch.arange(rank, dtype=torch.float32)
    noise = torch.randn(n, d, d, generator=gen) * (noise_edge / (2 * d**0.5))
    return a @ torch.diag_embed(s.expand(n, rank)) @ b.mT + noise


def gaussian(n: int, d: int, *, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, d, d, generator=gen) / d**0.5


def _rel_err(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((exact - est) / exact).abs().max())


def _estimator_errors(
    seq: list[torch.Tensor],
    exact: list[torch.Tensor],
    *,
    n_iter: int = DEFAULT_POWER_ITERS,
    init_iters: int = DEFAULT_INIT_ITERS,
    n_vectors: int = DEFAULT_N_VECTORS,
) -> float:
    """Worst relative error of one SpectralNormEstimator over successive calls on ``seq``."""
    est = SpectralNormEstimator(n_iter=n_iter, init_iters=init_iters, n_vectors=n_vectors)
    return max(_rel_err(est({"w": w})["w"].double(), ex) for w, ex in zip(seq, exact))


def accuracy_table(device: torch.device) -> None:
    # 1280 on CUDA; 768 on CPU to keep the float64 SVD references affordable
    d = D if device.type == "cuda" else 768
    gen = torch.Generator().manual_seed(0)
    n = 4 if device.type == "cuda" else 2
    kinds = {
        "gaussian": gaussian(n, d, gen=gen),
        "trained-like (decay 0.8)": trained_like(n, d, decay=0.8, gen=gen),
        "trained-like (decay 0.9)": trained_like(n, d, decay=0.9, gen=gen),
    }
    iters = [1, 2, 4, 8, 12, 16, 24, 32, 64, 128]
    print(f"\ncold start: max relative error over {n} matrices {d}x{d} (float32) vs iterations")
    print(f"{'matrices':<26}{'vectors':>8}" + "".join(f"{k:>9}" for k in iters))
    for name, w in kinds.items():
        w = w.to(device)
        exact = torch.linalg.svdvals(w.double())[..., 0]
        for n_vec in (1, 4):
            row = [_estimator_errors([w], [exact], init_iters=k, n_vectors=n_vec) for k in iters]
            print(f"{name:<26}{n_vec:>8}" + "".join(f"{e:>9.1e}" for e in row))

    n_calls = 5
    print(
        f"\nwarm calls (SpectralNormEstimator, init_iters={DEFAULT_INIT_ITERS}): before each call the "
        f"weights drift by a Gaussian update of the given relative Frobenius size; max relative error over "
        f"{n_calls} successive calls"
    )
    warm_iters = [1, 2, 4]
    drifts = [1e-3, 1e-2]
    head = "".join(f"{'n_iter=' + str(k):>11}" for k in warm_iters)
    print(f"{'matrices':<26}{'drift':>8}{'vectors':>8}" + head)
    for name, w0 in kinds.items():
        for drift in drifts:
            g = torch.Generator(device=device).manual_seed(2)
            seq = [w0.to(device)]
            for _ in range(n_calls):
                w = seq[-1]
                upd = torch.randn(w.shape, generator=g, device=device)
                scale = w.norm(dim=(-2, -1), keepdim=True) / upd.norm(dim=(-2, -1), keepdim=True)
                seq.append(w + drift * upd * scale)
            exact = [torch.linalg.svdvals(w.double())[..., 0] for w in seq]
            for n_vec in (1, 4):
                errs = [
                    _estimator_errors(seq, exact, n_iter=k, init_iters=DEFAULT_INIT_ITERS, n_vectors=n_vec)
                    for k in warm_iters
                ]
                print(f"{name:<26}{drift:>8.0e}{n_vec:>8}" + "".join(f"{e:>11.1e}" for e in errs))

    # top singular values trading places during training: value 1 falls, values 2 and 3 climb past it
    gen = torch.Generator().manual_seed(3)
    a = torch.linalg.qr(torch.randn(d, 8, generator=gen))[0]
    b = torch.linalg.qr(torch.randn(d, 8, generator=gen))[0]
    noise = torch.randn(d, d, generator=gen) * 0.25 / (2 * d**0.5)
    seq = []
    for t in range(41):
        f = t / 40
        s = 0.8 ** torch.arange(8.0)
        s[0], s[1], s[2] = 1.0 - 0.3 * f, 0.8 + 0.3 * f, 0.7 + 0.35 * f
        seq.append((a @ torch.diag(s) @ b.T + noise).to(device))
    exact = [torch.linalg.svdvals(w.double())[..., 0] for w in seq]
    print("\ntop singular values crossing over 41 calls: max relative error over the run")
    for n_vec in (1, 2, 4):
        err = _estimator_errors(seq, exact, n_vectors=n_vec)
        print(f"n_vectors={n_vec}, n_iter={DEFAULT_POWER_ITERS}: {err:.1e}")


def speed(device: torch.device) -> None:
    layers = 36 if device.type == "cuda" else CPU_LAYERS
    gen = torch.Generator().manual_seed(0)
    ws = {
        f"l{i}.{p}": (torch.randn(D, D, generator=gen) * 0.02).to(device)
        for i in range(layers)
        for p in ("q", "k", "v", "o")
    }
    est = SpectralNormEstimator(stack=True)
    est(ws)  # cold call

    def warm() -> None:
        est(ws)

    def exact() -> None:
        for w in ws.values():
            torch.linalg.matrix_norm(w, 2)

    def loop_one_step() -> None:
        for w in ws.values():
            power_iteration(w, n_iter=1)

    looped = SpectralNormEstimator(stack=False)
    looped(ws)
    single = SpectralNormEstimator(stack=False, n_vectors=1)
    single(ws)

    def warm_looped() -> None:
        looped(ws)

    def warm_single() -> None:
        single(ws)

    t_warm = time_call(warm, 3)
    t_warm_loop = time_call(warm_looped, 3)
    t_warm_single = time_call(warm_single, 3)
    t_loop = time_call(loop_one_step, 3)
    t_exact = time_call(exact, 1)
    note = "" if device.type == "cuda" else f" (CPU: {layers} of GPT-2 774M's 36 layers)"
    print(f"\n{len(ws)} matrices {D}x{D} on {device}{note}")
    print(f"{'method':<60}{'ms':>10}{'vs SVD':>10}")
    rows = [
        ("torch.linalg.matrix_norm(ord=2), one per matrix", t_exact),
        ("power iteration, 1 step, Python loop per matrix", t_loop),
        (f"estimator warm call, stacked (n_iter={DEFAULT_POWER_ITERS}, {DEFAULT_N_VECTORS} vectors)", t_warm),
        (
            f"estimator warm call, looped (n_iter={DEFAULT_POWER_ITERS}, {DEFAULT_N_VECTORS} vectors)",
            t_warm_loop,
        ),
        (f"estimator warm call, looped (n_iter={DEFAULT_POWER_ITERS}, 1 vector)", t_warm_single),
    ]
    for name, t in rows:
        print(f"{name:<60}{t * 1e3:>10.2f}{t_exact / t:>9.0f}x")
    sig = est(ws)
    errs = [abs(1 - float(sig[k]) / float(torch.linalg.matrix_norm(ws[k].double(), 2))) for k in list(ws)[:4]]
    print(f"relative error of the warm estimate on these random (hard) matrices: max {max(errs):.1e}")


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    speed(device)
    accuracy_table(device)


if __name__ == "__main__":
    main()
