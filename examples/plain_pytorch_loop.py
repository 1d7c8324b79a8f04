"""Train a tiny GPT from a plain PyTorch loop with thetascope's monitor cores (no Lightning).

It prints, at every measurement step, the values the Lightning callbacks (``AttentionSensitivityMonitor``,
``GradientFlowMonitor``, ``TemperatureWarmup``) would log, under the same keys::

    python examples/plain_pytorch_loop.py --steps 40 --every 10

Under ``torch.distributed`` (DDP) pass ``all_gather=distributed_all_gather()`` to :func:`train`: each
``reduce`` is then one collective, called on every rank at the same steps.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thetascope.demo.model import GPT, GPTConfig
from thetascope.keys import DEFAULT_PREFIX, TEMPERATURE_FIELD
from thetascope.monitors import GradientFlowCore, TemperatureController
from thetascope.monitors._collective import AllGather, local_all_gather
from thetascope.schedules import TemperatureSchedule

VOCAB, SEQ = 64, 16


def make_model(seed: int = 0) -> GPT:
    """A 2-layer, 32-wide GPT (pre-LN), initialised from ``seed``."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=32))


def make_batches(seed: int = 0, n: int = 32, batch_size: int = 4) -> list[tuple[Tensor, Tensor]]:
    """Next-token batches of arithmetic token sequences (something to learn), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    stride = torch.randint(1, 4, (n, 1), generator=gen)
    tokens = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return [(t[:, :-1], t[:, 1:]) for t in tokens.split(batch_size)]


def train(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int = 40,
    every: int = 10,
    schedule: TemperatureSchedule | None = None,
    rows_per_head: int = 16,
    backward: Callable[[Tensor], None] = Tensor.backward,
    all_gather: AllGather = local_all_gather,
    monitored: nn.Module | None = None,
    monitor_attention: bool = True,
) -> dict[int, dict[str, float]]:
    """Train for ``steps`` optimizer steps; return ``{step: {key: value}}`` for the measurement steps.

    ``model`` runs the forward; the cores watch ``monitored`` (default ``model``), the plain module behind a
    wrapper such as Fabric's. ``monitor_attention=False`` leaves the attention monitor out.
    """
    plain = model if monitored is None else monitored
    attention = None
    if monitor_attention:
        from thetascope.monitors import AttentionMonitor

        attention = AttentionMonitor(plain, rows_per_head=rows_per_head)
    gradients = GradientFlowCore(plain)
    temperature = TemperatureController(plain, schedule or TemperatureSchedule(4.0, 1.0, steps // 2))
    logged: dict[int, dict[str, float]] = {}
    for step, (x, y) in zip(range(steps), itertools.cycle(batches)):
        tau = temperature.step(step)  # before the forward passes of this optimizer step
        measuring = step % every == 0
        with attention.capture() if attention is not None and measuring else contextlib.nullcontext():
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        values: dict[str, float] = {}
        if measuring and attention is not None:
            # right after the captured forward, before the backward (as the callback does)
            values |= attention.reduce(attention.measure(), all_gather)
        backward(loss)
        # (unscale AMP gradients here) -> observe -> (clip here): the norms are those of the true gradients
        gradients.observe_step(optimizer)
        if measuring:
            values |= gradients.reduce(gradients.measure(optimizer), all_gather)
            values.setdefault(DEFAULT_PREFIX + TEMPERATURE_FIELD, tau)
            logged[step] = values
            if gradients.spike_detected:
                print(f"step {step}: gradient-norm or loss spike since the previous measurement")
        optimizer.step()
        optimizer.zero_grad()
        # after the step, as the callback does at the end of the batch: a measurement counts earlier losses
        gradients.observe_loss(loss.detach())
    temperature.remove()
    return logged


def show(logged: dict[int, dict[str, float]]) -> None:
    """Print the headline values of every measurement, then all keys of the last one."""
    p = DEFAULT_PREFIX
    for step, values in logged.items():
        print(
            f"step {step:4d}  theta_max {values.get(p + 'theta_max', float('nan')):.4f}  "
            f"grad_norm_global {values.get(p + 'grad_norm_global', float('nan')):.4f}  "
            f"temperature {values[p + TEMPERATURE_FIELD]:.3f}"
        )
    last = max(logged)
    print(f"all values logged at step {last}:")
    for key, value in sorted(logged[last].items()):
        print(f"  {key} = {value:.6g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    show(train(model, make_batches(), optimizer, steps=args.steps, every=args.every))


if __name__ == "__main__":
    main()
