"""Device operations (kernel launches on a GPU) of each thetascope path, counted on the issue-13 CPU model.

The counts are exact and do not depend on the machine or its load, so they show on any machine the part of
the GPU cost that comes from launching small kernels, which on an H100 is several microseconds of host time
per operation however little work it does. The model of ``bench_callbacks`` (pre-LN
``nn.TransformerEncoder`` LM, d=128, 4 heads, B=8, L=128) is built with 6 and with 12 layers; the difference
gives the operations per layer. Counted with the framework-free cores (what the callbacks run):

* ``training step``: forward, backward and a foreach AdamW step of the model alone, for scale;
* ``per-step path``: ``GradientFlowCore.observe_step`` + ``observe_loss`` on an unmeasured step (mean over 20
  steps past the spike detectors' warm-up, their refreshes included);
* ``temperature hook``: the extra operations of one forward + backward at tau = 2 over one at tau = 1;
* ``measured forward``: the extra operations of the captured forward (64 rows per head in every layer) over a
  plain one; then ``AttentionMonitor.measure``, its ``reduce`` and ``GradientFlowCore.measure`` + ``reduce``;
* the captured forward and ``measure`` again "as on a GPU": with the probe's accelerator policy (the rows of
  all layers wait for one joint bracket, whose blocks hold 2**23 elements), emulated on CPU.

Then the same paths of the ``make bench-gpu`` models, the demo GPT at GPT-2 124M (12 x 768, B=8) and 774M
(36 x 1280, B=4) shapes, L=1024, bf16 weights, 64 rows per head, counted on the ``meta`` device: no memory and
no arithmetic, but every operation a CUDA device would launch, with the paths CUDA takes (the accelerator
policy, the float64 token norms; the spectral estimator's start vectors come from a plain ``randn`` since meta
has no generator). The gradient measurement is counted up to its one host copy, which meta cannot make.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._ops import OpCounter
from benchmarks.bench_callbacks import VOCAB, make_data, make_module

DEPTHS = (6, 12)
CAPTURE = "measured forward (capture), extra"
MEASURE = "AttentionMonitor.measure"


def _counted_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    attention: Any,
    gradients: Any,
    x: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    measure: bool,
    reduce: bool = True,
) -> dict[str, int]:
    """One training step; the operations of its forward and, when ``measure``, of the measurement
    (``reduce=False``: without the reductions, which copy to the host). The per-step path runs uncounted (see
    :func:`_per_step_mean`)."""
    with OpCounter() as fwd:
        if measure:
            with attention.capture():
                out = model(x)
        else:
            out = model(x)
    loss = loss_of(out)
    loss.backward()
    gradients.observe_step(opt)
    gradients.observe_loss(loss)
    opt.step()
    opt.zero_grad()
    counts = {"forward": fwd.n}
    if measure:
        with OpCounter() as m:
            values = attention.measure()
        if reduce:
            with OpCounter() as r:
                attention.reduce(values)
            counts["reduce"] = r.n
        with OpCounter() as g:
            grads = gradients.measure(opt)
            if reduce:
                gradients.reduce(grads)
        counts.update(measure=m.n, gradients=g.n)
    return counts


def _per_step_mean(
    opt: torch.optim.Optimizer,
    gradients: Any,
    loss: Callable[[], torch.Tensor],
    warm: int = 30,
    n: int = 20,
) -> float:
    """Mean operations of ``observe_step`` + ``observe_loss`` over ``n`` calls after ``warm`` more, on the
    gradients of one backward: past the detectors' ``min_history`` (20), refreshes included at their rate
    (every 10th call), as on a long run's unmeasured steps."""
    value = loss()
    value.backward()
    counts = []
    for i in range(warm + n):
        with OpCounter() as ops:
            gradients.observe_step(opt)
            gradients.observe_loss(value)
        if i >= warm:
            counts.append(ops.n)
    opt.zero_grad()
    return sum(counts) / len(counts)


def _forward_backward(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
) -> int:
    """The operations of one forward and backward (no optimizer step)."""
    with OpCounter() as ops:
        loss_of(model(x)).backward()
    opt.zero_grad()
    return ops.n


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
        return _counted_step(
            model, opt, attention, gradients, x, lambda out: loss_of(out, y), measure=measure
        )

    temperature.step(0)
    for i in range(30):  # warm: detector history, power-iteration vectors
        train(*data[i], measure=i % 10 == 0)
    per_step = _per_step_mean(opt, gradients, lambda: loss_of(model(data[30][0]), data[30][1]))
    plain = train(*data[50])
    measured = train(*data[51], measure=True)

    def step_ops(x: torch.Tensor, y: torch.Tensor) -> int:
        return _forward_backward(model, opt, x, lambda out: loss_of(out, y))

    hooked = step_ops(*data[52])
    temperature.remove()
    unhooked = step_ops(*data[53])
    with OpCounter() as whole:  # nothing of thetascope left on the model now
        loss_of(model(data[54][0]), data[54][1]).backward()
        opt.step()
    opt.zero_grad()
    return {
        "training step without callbacks (fwd, bwd, AdamW)": whole.n,
        "per-step path (grad norm + 2 detector pushes)": per_step,
        "temperature hook, forward + backward": hooked - unhooked,
        CAPTURE: measured["forward"] - plain["forward"],
        MEASURE: measured["measure"],
        "AttentionMonitor.reduce": measured["reduce"],
        "GradientFlowCore.measure + reduce": measured["gradients"],
    }


@contextlib.contextmanager
def _patched(*changes: tuple[object, str, object]) -> Iterator[None]:
    """Set each ``(object, attribute, value)`` inside the block; the previous values come back on exit."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


@contextlib.contextmanager
def accelerator_policy() -> Iterator[None]:
    """Count as on a GPU: the rows of all layers wait for one joint bracket, in blocks of 2**23 elements."""
    import thetascope.capture.probe as probe
    import thetascope.functional.theta as theta

    with _patched(
        (probe, "_defers", lambda device: True), (theta, "_BLOCK_ELEMENTS", theta._DEVICE_BLOCK_ELEMENTS)
    ):
        yield


#: (name, layers, width, heads, batch) of the GPT-2 shapes of ``benchmarks/gpu.py``, counted on meta.
GPT2_SHAPES = (("GPT-2 124M", 12, 768, 12, 8), ("GPT-2 774M", 36, 1280, 20, 4))
GPT2_LENGTH, GPT2_VOCAB = 1024, 50257


@contextlib.contextmanager
def meta_as_cuda() -> Iterator[None]:
    """Let the cores run on the meta device along the paths they take on CUDA (see the module docstring)."""
    import thetascope.functional.norms as norms
    import thetascope.functional.spectral as spectral

    def wide(x: torch.Tensor) -> torch.Tensor | None:
        return None if x.dtype == torch.float64 else torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)

    def start_block(
        shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: object
    ) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device)

    with _patched(
        (norms, "_wide_token_norms", wide),
        (spectral, "_random_block", start_block),
        (spectral.SpectralNormEstimator, "_generator", lambda self, device: None),
    ):
        yield


def gpt2_counts(
    layers: int, d: int, heads: int, batch: int, length: int = GPT2_LENGTH, vocab: int = GPT2_VOCAB
) -> dict[str, float]:
    """Device operations of each path of the demo GPT of the given shape, counted on the meta device."""
    from thetascope.demo.model import GPT, GPTConfig
    from thetascope.monitors import AttentionMonitor, GradientFlowCore
    from thetascope.monitors.temperature import TemperatureController
    from thetascope.schedules.temperature import TemperatureSchedule

    with meta_as_cuda():
        with torch.device("meta"):
            cfg = GPTConfig(vocab_size=vocab, block_size=length, n_layer=layers, n_head=heads, n_embd=d)
            model = GPT(cfg).to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        attention, gradients = AttentionMonitor(model, rows_per_head=64), GradientFlowCore(model)
        x = torch.zeros(batch, length, dtype=torch.long, device="meta")

        def loss_of(out: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out.reshape(-1, vocab).float(), x.reshape(-1))

        def step(measure: bool) -> dict[str, int]:
            return _counted_step(model, opt, attention, gradients, x, loss_of, measure=measure, reduce=False)

        step(True)  # cold: power-iteration vectors, caches
        plain, measured = step(False), step(True)
        per_step = _per_step_mean(opt, gradients, lambda: loss_of(model(x)))
        temperature = TemperatureController(model, TemperatureSchedule(2.0, 1.0, 10**6))
        temperature.step(0)
        hooked = _forward_backward(model, opt, x, loss_of)
        temperature.remove()
        unhooked = _forward_backward(model, opt, x, loss_of)
    return {
        "per-step path": per_step,
        "temperature hook, forward + backward": hooked - unhooked,
        CAPTURE: measured["forward"] - plain["forward"],
        MEASURE: measured["measure"],
        "GradientFlowCore.measure (to its host copy)": measured["gradients"],
        "measured step, all of the above": measured["forward"]
        - plain["forward"]
        + measured["measure"]
        + measured["gradients"],
    }


def main(
    depths: tuple[int, int] = DEPTHS, shapes: tuple[tuple[str, int, int, int, int], ...] = GPT2_SHAPES
) -> dict[int | str, dict[str, float]]:
    """Print (and return, by depth or shape name) the operation counts described in the module docstring."""
    torch.set_num_threads(2)
    results: dict[int | str, dict[str, float]] = {d: _counts(d) for d in depths}
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
    if shapes:
        for name, layers, d, heads, batch in shapes:
            results[name] = gpt2_counts(layers, d, heads, batch)
        print("\ndemo GPT on the meta device, as on CUDA (bf16, L=1024, 64 rows per head): device operations")
        print(f"{'path':<50}" + "".join(f"{name:>14}" for name, *_ in shapes))
        for key in results[shapes[0][0]]:
            print(f"{key:<50}" + "".join(f"{results[name][key]:>14.1f}" for name, *_ in shapes))
    return results


if __name__ == "__main__":
    main()
