"""Capture overhead: one training step (forward + backward + SGD) of a small HF GPT-2 on CPU.

Conditions, timed in a paired run (each round runs every condition once in a shuffled order; the table shows
the median over rounds of each condition's time divided by the same round's no-probe time):

* ``no probe``: the plain model;
* ``probe, unmeasured step``: a probe exists, tau == 1, no capture (nothing is installed: the noise floor);
* ``probe, tau != 1``: the temperature hook active on every forward;
* ``probe, measured step``: ``probe.capture()`` around the forward (64 sampled rows per head, theta bracket).
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch


def _model(attn: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_positions=256,
        vocab_size=512,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(cfg).train()


def _run(attn: str, ids: torch.Tensor, rounds: int) -> None:
    from thetascope.capture import AttentionProbe

    model = _model(attn)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = AttentionProbe(model, rows_per_head=64)

    def step() -> None:
        out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def measured() -> None:
        with probe.capture():
            out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def tempered() -> None:
        probe.set_temperature(2.0)
        step()
        probe.set_temperature(1.0)

    conds: dict[str, Callable[[], None]] = {
        "no probe": step,
        "probe, unmeasured step": step,
        "probe, tau != 1": tempered,
        "probe, measured step": measured,
    }
    for fn in conds.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in conds}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(conds)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            conds[k]()
            times[k].append(time.perf_counter() - t0)
    base = times["no probe"]
    print(f"HF GPT-2 4x128, B={ids.shape[0]} L={ids.shape[1]}, attn={attn}, CPU, {rounds} paired rounds")
    print(f"  {'condition':<26}{'median ms':>10}{'median ratio':>14}")
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"  {k:<26}{1e3 * statistics.median(ts):>10.1f}{ratio:>14.3f}")
    # How much of the measured-step overhead is the theta bracket itself (functional/, same row shapes).
    from thetascope.functional.theta import balanced_mass_factor

    rows = torch.softmax(4 * torch.randn(ids.shape[0], 4, min(64, ids.shape[1]), ids.shape[1]), dim=-1)
    bmf = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        balanced_mass_factor(rows, validate=False)
        bmf.append(time.perf_counter() - t0)
    n_layers = len(probe.layers)
    bmf_ms = 1e3 * n_layers * statistics.median(bmf)
    print(f"  theta bracket alone, {n_layers} layers x {tuple(rows.shape)}: {bmf_ms:.1f} ms")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # steadier timings on a shared machine
    ids = torch.randint(0, 512, (4, 64))
    for attn in ("sdpa", "eager"):
        _run(attn, ids, rounds=12)


if __name__ == "__main__":
    main()
