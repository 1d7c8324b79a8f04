"""Capture overhead: one training step (forward + backward + SGD) of a small HF GPT-2 on CPU.

Conditions, timed in a paired run (each round runs every condition once in a shuffled order; the table shows
the median over rounds of each condition's time divided by the same round's no-probe time):

* ``no probe``: the plain model;
* ``probe, unmeasured step``: a probe exists, tau == 1, no capture (nothing is installed: the noise floor);
* ``probe, tau != 1``: the temperature hook active on every forward;
* ``probe, measured step``: ``probe.capture()`` around the forward (64 sampled rows per head, theta bracket).

Then the temperature hook alone (issue goal: <= 1.02x per step) on a 6-layer d=128 pre-LN
``nn.TransformerEncoder`` LM, batch 8, L=128, 2 threads: training steps with tau = 2 against tau = 1 (no hook
installed), paired and interleaved in one run, median of the per-round ratios.
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch


def _model(attn: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # attn_implementation is taken by PretrainedConfig's **kwargs, which the GPT2Config stub does not declare
    extra: dict[str, Any] = {"attn_implementation": attn}
    cfg = GPT2Config(
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_positions=256,
        vocab_size=512,
        bos_token_id=0,
        eos_token_id=0,
        **extra,
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


class _EncoderLM(torch.nn.Module):
    """Causal LM on ``nn.TransformerEncoder`` (pre-LN), as a user writes it with torch only."""

    def __init__(
        self, vocab: int = 512, d: int = 128, n_layers: int = 6, n_heads: int = 4, length: int = 128
    ):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(length, d))
        layer = torch.nn.TransformerEncoderLayer(
            d, n_heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = torch.nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        return self.head(self.body(x, mask=self.mask, is_causal=True))


def _temperature(rounds: int) -> None:
    from thetascope.capture import AttentionProbe

    torch.manual_seed(0)
    model = _EncoderLM().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = AttentionProbe(model)
    ids = torch.randint(0, 512, (8, 128))

    def step(tau: float) -> tuple[float, float]:
        probe.set_temperature(tau)  # what TemperatureController.step does once per optimizer step
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    for tau in (1.0, 2.0, 1.0, 2.0):  # warm-up
        step(tau)
    wall: dict[float, list[float]] = {1.0: [], 2.0: []}
    cpu: dict[float, list[float]] = {1.0: [], 2.0: []}
    rng = random.Random(1)
    for _ in range(rounds):
        order = [1.0, 2.0]
        rng.shuffle(order)
        for tau in order:
            w, c = step(tau)
            wall[tau].append(w)
            cpu[tau].append(c)
    probe.set_temperature(1.0)

    def ratio(t: dict[float, list[float]]) -> float:
        return statistics.median(a / b for a, b in zip(t[2.0], t[1.0]))

    n = torch.get_num_threads()
    print(f"torch TransformerEncoder LM 6x128 pre-LN, B=8 L=127, CPU, {n} threads, {rounds} paired rounds")
    print(f"  median step: tau = 1 {1e3 * statistics.median(wall[1.0]):.1f} ms, tau = 2 "
          f"{1e3 * statistics.median(wall[2.0]):.1f} ms")  # fmt: skip
    print(f"  temperature hook, per-step ratio tau=2 / tau=1 (goal <= 1.02): wall {ratio(wall):.3f}, "
          f"process CPU time {ratio(cpu):.3f}")  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # steadier timings on a shared machine
    ids = torch.randint(0, 512, (4, 64))
    for attn in ("sdpa", "eager"):
        _run(attn, ids, rounds=12)
    torch.set_num_threads(2)
    _temperature(rounds=20)
    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
