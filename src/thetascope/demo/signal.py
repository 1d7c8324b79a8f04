"""The signal-propagation experiment (``thetascope demo --preset signal``): APJN depth profiles at init.

For pre-LN, post-LN, DyT and Derf versions of the demo GPT, with bidirectional and causal attention, at
several depths and seeds, it measures the APJN from the input of the first block to the output of every
block with :class:`~thetascope.monitors.signal.SignalPropagationCore`, fits each profile (power law vs
stretched exponential) and writes, under ``<out>/signal/``:

* ``profiles.csv``: ``norm, attention, depth, seed, layer, apjn, stderr`` (``layer`` 1-based: blocks crossed);
* ``fits.csv``: one row per profile with every :class:`~thetascope.functional.depth_fit.DepthFit` field;
* ``summary.json``: per norm, attention and depth, the mean and standard deviation over seeds of the fitted
  exponents and fit qualities, and the verdicts;
* ``apjn_vs_depth.png``: the profiles on log-log axes;
* ``train/<norm>/metrics.csv``: short training runs (12 layers) with
  :class:`~thetascope.callbacks.SignalPropagationMonitor` attached, so the report also shows alpha and
  saturation over training.

Initialisation: the theory behind the seed paper assumes O(1) weights, so every Linear weight is drawn from
``N(0, sigma_w^2 / fan_in)`` (biases zero) and embeddings from ``N(0, 1)``; the demo's GPT-2 initialisation
(std 0.02, depth-scaled output projections) makes every residual branch so small that the profile is flat.
Inputs are random byte ids.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import torch
from torch import nn

from thetascope.demo.model import GPT, GPTConfig, NormPlacement
from thetascope.functional.depth_fit import DepthFit, fit_depth_profile
from thetascope.keys import SIGNAL_FIT_FIELDS
from thetascope.monitors.signal import SignalPropagationCore

__all__ = ["SignalExperiment", "measure_profile", "run_signal_experiment", "standard_init"]


@dataclass(frozen=True)
class SignalExperiment:
    """What the experiment measures.

    Example:
        >>> SignalExperiment().n_profiles
        72
    """

    norms: tuple[str, ...] = ("pre", "post", "dyt", "derf")
    attentions: tuple[str, ...] = ("bidirectional", "causal")
    depths: tuple[int, ...] = (12, 24, 48)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_embd: int = 64
    n_head: int = 4
    seq_len: int = 16
    batch_size: int = 4
    n_probes: int = 4
    sigma_w: float = 1.0
    train_steps: int = 40
    train_norms: tuple[str, ...] = ("pre", "dyt", "derf")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_profiles(self) -> int:
        """Number of profiles measured."""
        return len(self.norms) * len(self.attentions) * len(self.depths) * len(self.seeds)


def standard_init(model: nn.Module, sigma_w: float = 1.0) -> nn.Module:
    """Linear weights ``N(0, sigma_w^2 / fan_in)``, biases 0, embeddings ``N(0, 1)`` (in place).

    A Linear whose weight is an embedding's (a tied output head) keeps the embedding's initialisation.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in tied:
                m.weight.normal_(0.0, sigma_w / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0)
    return model


def measure_profile(
    norm: str, causal: bool, depth: int, seed: int, exp: SignalExperiment | None = None
) -> tuple[list[float], list[float]]:
    """APJN and its standard error at depths ``1..depth`` of one freshly initialised model.

    Example:
        >>> apjn, se = measure_profile("dyt", True, 4, 0, SignalExperiment(n_embd=16, n_head=2, seq_len=4))
        >>> len(apjn), all(v > 0 for v in apjn)
        (4, True)
    """
    exp = exp or SignalExperiment()
    torch.manual_seed(seed)
    config = GPTConfig(
        n_layer=depth,
        n_embd=exp.n_embd,
        n_head=exp.n_head,
        block_size=exp.seq_len,
        norm=cast(NormPlacement, norm),
        causal=causal,
    )
    model = standard_init(GPT(config), exp.sigma_w)
    idx = torch.randint(0, config.vocab_size, (exp.batch_size, exp.seq_len))
    core = SignalPropagationCore(model, n_probes=exp.n_probes, seed=seed, strict=True)
    vals = core.measure(lambda: model(idx))
    return vals["apjn"].double().tolist(), vals["apjn_se2"].double().sqrt().tolist()


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "sd": math.nan}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def _summary(fits: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in fits:
        groups.setdefault((row["norm"], row["attention"], int(row["depth"])), []).append(row)
    out = []
    for (norm, att, depth), rows in groups.items():
        entry: dict[str, Any] = {"norm": norm, "attention": att, "depth": depth, "seeds": len(rows)}
        for f in SIGNAL_FIT_FIELDS:
            entry[f] = _mean_sd([float(r[f]) for r in rows])
        entry["apjn_last"] = _mean_sd([float(r["apjn_last"]) for r in rows])
        entry["verdicts"] = {
            v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})
        }
        out.append(entry)
    return out


def _train(out: Path, exp: SignalExperiment, stream: TextIO) -> list[Path]:
    """Short training runs with the monitor attached (alpha and saturation over training)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from thetascope.callbacks import SignalPropagationMonitor
    from thetascope.demo.data import ByteWindows, load_corpus
    from thetascope.demo.train import DemoLM

    corpus = load_corpus(300_000)
    runs = []
    for norm in exp.train_norms:
        L.seed_everything(0, verbose=False)
        cfg = GPTConfig(
            n_layer=12, n_embd=exp.n_embd, n_head=exp.n_head, block_size=32, norm=cast(NormPlacement, norm)
        )
        module = DemoLM(cfg, lr=1e-3, warmup_steps=10)
        standard_init(module.model, exp.sigma_w)
        data = DataLoader(
            ByteWindows(corpus.train, 32, exp.train_steps * 8, seed=0), batch_size=8, drop_last=True
        )
        trainer = L.Trainer(
            max_steps=exp.train_steps,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(save_dir=str(out), name=norm, version=""),
            callbacks=[SignalPropagationMonitor(every_n_steps=max(exp.train_steps // 4, 1), n_probes=2)],
            log_every_n_steps=5,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=data)
        loss = trainer.callback_metrics.get("train/loss")
        print(
            f"  trained {norm:<5} 12 layers, {exp.train_steps} steps in {time.perf_counter() - t0:.0f} s"
            + (f", final loss {float(loss):.3f}" if loss is not None else ""),
            file=stream,
        )
        runs.append(out / norm)
    return runs


def run_signal_experiment(
    out: Path | str, exp: SignalExperiment | None = None, stream: TextIO | None = None
) -> dict[str, Any]:
    """Measure every profile, fit, write the files listed in the module docstring; return the summary.

    Example:
        >>> run_signal_experiment("/tmp/ts-signal")  # doctest: +SKIP
    """
    exp = exp or SignalExperiment()
    stream = stream if stream is not None else sys.stdout
    root = Path(out) / "signal"
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    profiles: list[dict[str, Any]] = []
    fits: list[dict[str, Any]] = []
    try:
        for att in exp.attentions:
            for norm in exp.norms:
                t0 = time.perf_counter()
                for depth in exp.depths:
                    for seed in exp.seeds:
                        apjn, se = measure_profile(norm, att == "causal", depth, seed, exp)
                        for layer, (v, e) in enumerate(zip(apjn, se), start=1):
                            profiles.append(
                                dict(
                                    norm=norm,
                                    attention=att,
                                    depth=depth,
                                    seed=seed,
                                    layer=layer,
                                    apjn=v,
                                    stderr=e,
                                )
                            )
                        fit: DepthFit = fit_depth_profile(apjn)
                        fits.append(
                            dict(
                                norm=norm,
                                attention=att,
                                depth=depth,
                                seed=seed,
                                apjn_last=apjn[-1],
                                **fit.as_dict(),
                            )
                        )
                last = [f for f in fits if f["norm"] == norm and f["attention"] == att][-1]
                print(
                    f"  {att:<13} {norm:<5} depth {exp.depths[-1]} seed {exp.seeds[-1]}: {last['verdict']}, "
                    f"zeta={last['power_exponent']:.2f} (R^2 {last['power_r2']:.3f}), "
                    f"beta={last['stretched_beta']:.2f} (R^2 {last['stretched_r2']:.3f})  "
                    f"[{time.perf_counter() - t0:.0f} s]",
                    file=stream,
                )
        _write(root, exp, profiles, fits, start, stream)
        if exp.train_steps > 0 and exp.train_norms:
            _train(root / "train", exp, stream)
    finally:
        torch.set_num_threads(threads)
    return json.loads((root / "summary.json").read_text())


def _write(
    root: Path,
    exp: SignalExperiment,
    profiles: list[dict[str, Any]],
    fits: list[dict[str, Any]],
    start: float,
    stream: TextIO,
) -> None:
    for name, rows in (("profiles.csv", profiles), ("fits.csv", fits)):
        with open(root / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = {
        "settings": {k: v for k, v in exp.__dict__.items() if k != "extra"},
        "seconds": round(time.perf_counter() - start, 1),
        "groups": _summary(fits),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    from thetascope.report.signal import draw_experiment_figure, read_profiles

    draw_experiment_figure(read_profiles(root / "profiles.csv"), root / "apjn_vs_depth.png")
    print(f"measured {len(fits)} profiles in {summary['seconds']:.0f} s -> {root}", file=stream)
