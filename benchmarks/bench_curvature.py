"""Cost of one curvature measurement as a multiple of one training step, for each HVP backend.

The demo's GPT (on CPU the default preset's width at 4 layers: d=64, L=64, batch 8; a GPT-2-small-like shape
on a GPU) with AdamW. One training step (forward, backward, AdamW step) and one :class:`CurvatureCore`
measurement with the demo's settings (8 Lanczos iterations for the sharpness, 8 for Adam's preconditioned
sharpness, 2 Hutchinson samples, the Taylor check) are timed side by side in the same run, per backend.
Also reports the cost of one HVP in training steps. ``double_backward`` is unavailable where SDPA picks a
fused kernel (CPU flash, CUDA flash / memory-efficient); ``math_sdpa`` is the same double backward with
SDPA's math kernel, what ``backend="auto"`` then uses.
"""

from __future__ import annotations

import torch

from benchmarks._timing import time_call
from thetascope.demo.model import GPT, GPTConfig
from thetascope.monitors.curvature import CurvatureCore


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        cfg = GPTConfig(block_size=256, n_layer=12, n_head=12, n_embd=768)
        batch = 8
    else:
        cfg = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64)  # a third of the demo's depth: fast
        batch = 8
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(x, y).backward()
        opt.step()

    step_s = time_call(train_step, 5)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"device {device.type}, {cfg.n_layer} layers, d={cfg.n_embd}, L={cfg.block_size}, batch {batch}, "
        f"{n_params / 1e6:.2f}M parameters; one training step {step_s * 1e3:.1f} ms"
    )
    print(f"{'backend':<20} {'measurement':>12} {'x step':>8} {'HVP x step':>11}")
    for backend in ("double_backward", "math_sdpa", "finite_difference"):
        core = CurvatureCore(model, iters=8, trace_samples=2, backend=backend, strict=True)
        hvps = 8 + 8 + 2 + 1  # sharpness, preconditioned, Hutchinson, Taylor

        def measure(core: CurvatureCore = core) -> None:
            opt.zero_grad(set_to_none=True)
            model.loss(x, y).backward()
            core.snapshot(opt)
            opt.step()
            vals = core.measure(lambda: model.loss(x, y), opt)
            core.reduce(vals)

        try:
            total = time_call(measure, 1) - step_s  # the training step inside is not the cost
        except RuntimeError as err:  # SDPA's fused kernels have no double backward
            print(f"{backend:<20} unavailable: {str(err).splitlines()[0][:70]}")
            continue
        print(f"{backend:<20} {total * 1e3:>10.0f}ms {total / step_s:>8.1f} {total / hvps / step_s:>11.2f}")
