"""SignalPropagationMonitor in a real Trainer: keys at the expected steps, no effect on training, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.callbacks._models import LM, read_csv_metrics, token_data, trainer
from tests.helpers.threads import single_thread  # noqa: F401  (autouse: one intra-op thread)
from thetascope.callbacks import SignalPropagationMonitor


def _fit(root: Path, callbacks: list, steps: int = 5, kind: str = "demo-dyt", **kw: object) -> LM:
    lm = LM(kind, n_layer=4, d=16, n_head=2, lr=1e-2)
    trainer(root, callbacks, steps=steps, **kw).fit(lm, token_data(n=16, batch_size=4))
    return lm


def test_keys_at_fit_start_and_every_n_steps_in_csv(tmp_path: Path) -> None:
    mon = SignalPropagationMonitor(every_n_steps=2, n_probes=2, max_samples=2)
    _fit(tmp_path, [mon])
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    for key in (
        "stability/apjn/layer_00",
        "stability/apjn/layer_03",
        "stability/apjn_stderr/layer_03",
        "stability/signal/verdict",
        "stability/signal/power_exponent",
        "stability/signal/stretched_beta",
        "stability/card/signal_verdict",
        "stability/norm_alpha/ln_1/layer_00",
        "stability/norm_saturation/ln_2/layer_03",
        "stability/norm_alpha/model.transformer.ln_f",
        "stability/signal/norm_saturation",
    ):
        assert set(csv[key]) == {0, 2, 4}, key
    alpha = csv["stability/norm_alpha/ln_1/layer_00"]
    assert alpha[0] == 0.5
    assert alpha[4] != 0.5
    assert all(0.0 <= v <= 1.0 for v in csv["stability/norm_saturation/ln_2/layer_03"].values())
    assert mon.card_line is not None
    assert "signal propagation at init" in mon.card_line


def test_fit_start_only_by_default_and_no_norm_keys_for_layernorm(tmp_path: Path) -> None:
    calls: list[int] = []

    def forward(module: LM, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls.append(batch[0].shape[0])
        return module(batch[0])

    _fit(
        tmp_path,
        [SignalPropagationMonitor(n_probes=2, max_samples=3, forward=forward)],
        kind="demo-pre",
        steps=3,
    )
    assert calls == [3]  # one measurement, on the first 3 samples of the first batch
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    assert set(csv["stability/apjn/layer_02"]) == {0}
    assert not any("norm_alpha" in k for k in csv)


def test_training_is_bitwise_identical_with_and_without_the_monitor(tmp_path: Path) -> None:
    mon = SignalPropagationMonitor(every_n_steps=1, n_probes=2)
    with_mon = _fit(tmp_path / "a", [mon], steps=3)
    rng_with = torch.get_rng_state()
    without = _fit(tmp_path / "b", [], steps=3)
    rng_without = torch.get_rng_state()
    assert mon.core is not None
    assert mon.core.measurements == 3
    for (name, p), q in zip(with_mon.named_parameters(), without.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(rng_with, rng_without)  # the measurements drew nothing from the global generator


def test_resume_does_not_remeasure_the_initialisation(tmp_path: Path) -> None:
    mon = SignalPropagationMonitor(every_n_steps=3, n_probes=2)
    lm = LM("demo-pre", n_layer=4, d=16, n_head=2)
    t = trainer(tmp_path / "first", [mon], steps=4)
    t.fit(lm, token_data(n=16, batch_size=4))
    t.save_checkpoint(tmp_path / "s4.ckpt")
    state = torch.load(tmp_path / "s4.ckpt", weights_only=False)["callbacks"][mon.state_key]
    assert state["measured_init"]
    assert state["core"]["measurements"] == 2
    again = SignalPropagationMonitor(every_n_steps=3, n_probes=2)
    t2 = trainer(tmp_path / "second", [again], steps=7)
    t2.fit(
        LM("demo-pre", n_layer=4, d=16, n_head=2),
        token_data(n=16, batch_size=4),
        ckpt_path=tmp_path / "s4.ckpt",
    )
    csv = read_csv_metrics(tmp_path / "second/csv/version_0/metrics.csv")
    assert set(csv["stability/apjn/layer_00"]) == {6}
    assert again.core is not None
    assert again.core.measurements == 3
    assert again.card_line is not None


def test_bad_arguments_raise_at_construction() -> None:
    for bad in (
        dict(every_n_steps=0),
        dict(n_probes=1),
        dict(max_samples=0),
        dict(saturation_threshold=-1.0),
        dict(forward=3),
        dict(layers="some"),
        dict(strict="yes"),
    ):
        with pytest.raises(ValueError):
            SignalPropagationMonitor(**bad)  # type: ignore[arg-type]


def test_held_batch_takes_the_first_samples_of_every_tensor() -> None:
    from thetascope.callbacks.signal import _head

    t = torch.arange(10).reshape(5, 2)
    held = _head({"ids": t, "pair": [t, (t, "x")], "n": 3}, 2)
    assert torch.equal(held["ids"], t[:2])
    assert held["n"] == 3
    assert torch.equal(held["pair"][1][0], t[:2])
    assert held["pair"][1][1] == "x"
    held["ids"][0, 0] = 99
    assert t[0, 0] == 0  # a copy, not a view of the training batch
