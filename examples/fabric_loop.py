"""Train a tiny GPT with Lightning Fabric and thetascope's monitor cores.

The same loop as ``plain_pytorch_loop.py``, with Fabric's ``backward`` and its collective: under several
devices each ``reduce`` is one ``fabric.all_gather``, called on every rank at the same steps::

    python examples/fabric_loop.py --steps 40 --every 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_pytorch_loop import make_batches, make_model, show, train

from thetascope.monitors._collective import AllGather


def fabric_all_gather(fabric: Fabric) -> AllGather:
    """The :data:`~thetascope.monitors._collective.AllGather` of ``fabric``: ``[K] -> [world, K]``."""

    def gather(vec: Tensor) -> Tensor:
        return fabric.all_gather(vec).reshape(fabric.world_size, -1)  # type: ignore[union-attr]

    return gather


def run(
    fabric: Fabric, steps: int = 40, every: int = 10, seed: int = 0, monitor_attention: bool = True
) -> dict[int, dict[str, float]]:
    """Set up model and optimizer through ``fabric`` and train; ``{step: {key: value}}`` as measured."""
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wrapped, optimizer = fabric.setup(model, optimizer)
    batches = [(x.to(fabric.device), y.to(fabric.device)) for x, y in make_batches(seed)]
    # Fabric's wrapper runs the forward and the backward; the cores watch the plain module
    return train(
        wrapped,
        batches,
        optimizer,
        steps=steps,
        every=every,
        backward=fabric.backward,
        all_gather=fabric_all_gather(fabric),
        monitored=model,
        monitor_attention=monitor_attention,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    logged = run(fabric, args.steps, args.every)
    if fabric.is_global_zero:
        show(logged)


if __name__ == "__main__":
    main()
