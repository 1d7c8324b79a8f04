"""Cost of one SignalPropagationMonitor measurement against one training step of the same model.

A measurement is one forward of the held batch plus ``n_probes`` vector-Jacobian products per block (each
backward crosses the blocks up to that one), so it grows like ``n_probes * depth^2 / 2`` block-backwards; it
runs at fit start and every ``every_n_steps`` steps only. Both sides run in the same process, alternated.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks._timing import time_call
from thetascope.demo.model import GPT, GPTConfig
from thetascope.monitors.signal import SignalPropagationCore


def _case(
    device: torch.device, n_layer: int, d: int, probes: int, held: int, seq: int
) -> tuple[float, float]:
    """(seconds per measurement, seconds per training step) for one shape."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_embd=d, n_head=4, block_size=seq, norm="dyt")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (8, seq), device=device)
    xh = x[:held]
    core = SignalPropagationCore(model, n_probes=probes)

    def step() -> None:
        loss = model.loss(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def measure() -> None:
        core.reduce(core.measure(lambda: model(xh)))

    return time_call(measure, 3, stat=statistics.median), time_call(step, 3, stat=statistics.median)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    cases = [(12, 64, 4, 4, 64), (24, 64, 4, 4, 64), (12, 64, 2, 4, 64)]
    if device.type == "cuda":
        cases += [(12, 768, 4, 4, 256), (48, 256, 4, 4, 128)]
    print(f"device {device}; measurement on `held` samples vs a training step on 8 samples")
    head = ("layers", "d", "probes", "held", "L", "measure ms", "step ms", "ratio")
    print("{:>6} {:>5} {:>6} {:>4} {:>4} {:>11} {:>9} {:>6}".format(*head))
    try:
        for n_layer, d, probes, held, seq in cases:
            t_meas, t_step = _case(device, n_layer, d, probes, held, seq)
            row = (n_layer, d, probes, held, seq, 1e3 * t_meas, 1e3 * t_step, t_meas / t_step)
            print("{:>6} {:>5} {:>6} {:>4} {:>4} {:>11.1f} {:>9.1f} {:>6.1f}".format(*row))
    finally:
        torch.set_num_threads(threads)
    print("ratio = one measurement / one training step; amortised over every_n_steps steps")


if __name__ == "__main__":
    main()
