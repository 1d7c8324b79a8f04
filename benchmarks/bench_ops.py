"""Device operations (kernel launches on a GPU) of each thetascope path, counted on the issue-13 CPU model.

The counts are exact and do not depend on the machine or its load, so they show on any machine the part of
the GPU cost that comes from launching small kernels, which on an H100 is several microseconds of host time
per operation however little work it does. The model of ``bench_callbacks`` (pre-LN
``nn.TransformerEncoder`` LM, d=128, 4 heads, B=8, L=128) is built with 6 and with 12 layers; the difference
gives the operations per layer. Counted with the framework-free cores (what the callbacks run):

* ``training step``: forward, backward and a foreach AdamW step of the model alone, for scale;
* ``per-step path``: ``GradientFlowCore.observe_step`` + ``observe_loss`` on an unmeasured step (mean over 20
  steps, detector refreshes included);
* ``temperature hook``: the extra operations of one forward + backward at tau = 2 over one at tau = 1;
* ``measured forward``: the extra operations of the captured forward (64 rows per head in every layer) over a
  plain one; then ``AttentionMonitor.measure``, its ``reduce`` and ``GradientFlowCore.measure`` + ``reduce``;
* the captured forward and ``measure`` again "as on a GPU": with the probe's accelerator policy (the rows of
  all layers wait for one joint bracket, whose blocks hold 2**23 elements), emulated on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from benchmarks._ops import OpCounter
from benchmarks.bench_callbacks import VOCAB, make_data, make_module

DEPTHS = (6, 12)
CAPTURE = "measured forward (capture), extra"
MEASURE = "AttentionMonitor.measure"


def _counts(layers: int) -> dict[str, float]:
    from thetascope.monitors import AttentionMonitor, GradientFlowCore
    from thetascope.monitors.temperature import TemperatureController
    from thetascope.schedules.temperature import TemperatureSchedule

    model = make_module(layers=layers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    attention, gradients = AttentionMonitor(model), GradientFlowCore(model)
    temperature = TemperatureController(model, TemperatureSchedule(2.0, 1.0, 10**6))
    data = list(make_data(60))

    def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))

    def train(x: torch.Tensor, y: torch.Tensor, *, measure: bool = False) -> dict[str, int]:
        counts: dict[str, int] = {}
        with OpCounter() as fwd:
            if measure:
                with attention.capture():
                    out = model(x)
            else:
                out = model(x)
        loss = loss_of(out, y)
        loss.backward()
        with OpCounter() as per_step:
            gradients.observe_step(opt)
            gradients.observe_loss(loss)
        opt.step()
        opt.zero_grad()
        counts["forward"], counts["per_step"] = fwd.n, per_step.n
        if measure:
            with OpCounter() as m:
                values = attention.measure()
            with OpCounter() as r:
                attention.reduce(values)
            with OpCounter() as g:
                gradients.reduce(gradients.measure(opt))
            counts.update(measure=m.n, reduce=r.n, gradients=g.n)
        return counts

    temperature.step(0)
    for i in range(30):  # warm: detector history, power-iteration vectors
        train(*data[i], measure=i % 10 == 0)
    per_step = [train(*data[i])["per_step"] for i in range(30, 50)]
    plain = train(*data[50])
    measured = train(*data[51], measure=True)

    def step_ops(x: torch.Tensor, y: torch.Tensor) -> int:
        with OpCounter() as ops:
            loss_of(model(x), y).backward()
        opt.zero_grad()
        return ops.n

    hooked = step_ops(*data[52])
    temperature.remove()
    unhooked = step_ops(*data[53])
    with OpCounter() as whole:  # nothing of thetascope left on the model now
        loss_of(model(data[54][0]), data[54][1]).backward()
        opt.step()
    opt.zero_grad()
    return {
        "training step without callbacks (fwd, bwd, AdamW)": whole.n,
        "per-step path (grad norm + 2 detector pushes)": sum(per_step) / len(per_step),
        "temperature hook, forward + backward": hooked - unhooked,
        CAPTURE: measured["forward"] - plain["forward"],
        MEASURE: measured["measure"],
        "AttentionMonitor.reduce": measured["reduce"],
        "GradientFlowCore.measure + reduce": measured["gradients"],
    }


@contextlib.contextmanager
def accelerator_policy() -> Iterator[None]:
    """Count as on a GPU: the rows of all layers wait for one joint bracket, in blocks of 2**23 elements."""
    import thetascope.capture.probe as probe
    import thetascope.functional.theta as theta

    defers, block = probe._defers, theta._BLOCK_ELEMENTS
    probe._defers = lambda device: True  # type: ignore[assignment]
    theta._BLOCK_ELEMENTS = theta._DEVICE_BLOCK_ELEMENTS
    try:
        yield
    finally:
        probe._defers, theta._BLOCK_ELEMENTS = defers, block  # type: ignore[assignment]


def main(depths: tuple[int, int] = DEPTHS) -> dict[int, dict[str, float]]:
    """Print (and return, by depth) the operation counts described in the module docstring."""
    torch.set_num_threads(2)
    results = {d: _counts(d) for d in depths}
    for d in depths:
        with accelerator_policy():
            gpu = _counts(d)
        results[d][f"{CAPTURE}, as on a GPU"] = gpu[CAPTURE]
        results[d][f"{MEASURE}, as on a GPU"] = gpu[MEASURE]
    a, b = depths
    print(
        f"device operations (aten ops, views and allocations excluded); TransformerEncoder LM, {a}/{b} layers"
    )
    print(f"{'path':<50}{a:>8}{b:>8}{'per layer':>11}")
    for key in results[a]:
        va, vb = results[a][key], results[b][key]
        print(f"{key:<50}{va:>8.1f}{vb:>8.1f}{(vb - va) / (b - a):>11.1f}")
    return results


if __name__ == "__main__":
    main()
