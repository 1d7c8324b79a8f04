"""StabilityCallback on a real ``transformers.Trainer`` (tiny GPT-2 from a config, CPU).

The keys land in ``log_history`` at the expected steps, equal to the cores' values recomputed on the same
batch and weights."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.callbacks._models import make_model, token_data

transformers = pytest.importorskip("transformers")

from thetascope.integrations.hf import StabilityCallback  # noqa: E402
from thetascope.monitors.gradient import GradientFlowCore  # noqa: E402

P = "stability/"


class _Batches(torch.utils.data.Dataset):
    def __init__(self) -> None:
        xs = [x for bx, _ in token_data(n=32) for x in bx]
        self.items = [{"input_ids": x, "labels": x.clone()} for x in xs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def _train(tmp_path: Path, cb: StabilityCallback, **args: Any) -> tuple[Any, list[tuple[dict, dict]]]:
    model = make_model("gpt2", n_layer=3, d=32, n_head=4)
    seen: list[tuple[dict, dict]] = []  # (weights, inputs) of every training forward, in call order

    def record(module: torch.nn.Module, a: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            seen.append(
                (
                    copy.deepcopy(module.state_dict()),
                    {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)},
                )
            )

    model.register_forward_pre_hook(record, with_kwargs=True)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **args,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=_Batches())
    trainer.add_callback(cb.attach(trainer))
    trainer.train()
    return trainer, seen


def _reference_model(weights: dict) -> torch.nn.Module:
    ref = make_model("gpt2", n_layer=3, d=32, n_head=4)
    ref.load_state_dict(weights)
    return ref.train()


def test_gradient_keys_in_log_history_equal_the_core_on_the_same_batch(tmp_path: Path) -> None:
    cb = StabilityCallback(attention=False)  # every_n_steps: the Trainer's logging_steps (2)
    trainer, seen = _train(tmp_path, cb, max_grad_norm=0.0)
    rows = [r for r in trainer.state.log_history if f"{P}grad_norm_global" in r]
    assert [r["step"] for r in rows] == [2, 4]
    # the Trainer's own rows are there too, and our values reached log_history through Trainer.log
    assert any("loss" in r for r in trainer.state.log_history)
    for row in rows:
        weights, inputs = seen[row["step"] - 1]  # optimizer step s is the s-th forward (no accumulation)
        ref = _reference_model(weights)
        ref(**inputs).loss.backward()
        core = GradientFlowCore(ref)
        core.observe_step()
        expected = core.reduce(core.measure())
        for key in [k for k in expected if k.startswith((f"{P}grad_norm", f"{P}grad/"))]:
            if "spike" in key or "nonfinite" in key:
                continue
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert cb.diagnosis is not None
    assert any(li.topic in ("gradient flow", "post-LN gradient pathology") for li in cb.diagnosis.lines)


def test_summary_mode_and_post_clip_gradients(tmp_path: Path) -> None:
    cb = StabilityCallback(every_n_steps=1, attention=False, log="summary")
    trainer, _ = _train(tmp_path, cb, max_grad_norm=1e-3)
    rows = [r for r in trainer.state.log_history if any(k.startswith(P) for k in r)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({k for k in r if k.startswith(P)} == {f"{P}grad_norm_global"} for r in rows)
    # on_pre_optimizer_step runs after the Trainer's clipping: the global norm seen is the clipped one
    assert all(r[f"{P}grad_norm_global"] <= 1e-3 * (1 + 1e-4) for r in rows)
    hf_rows = [r for r in trainer.state.log_history if "grad_norm" in r]
    assert all(r["grad_norm"] > 1e-2 for r in hf_rows)  # the Trainer's own grad_norm is pre-clip
    assert math.isfinite(cb.last_values[f"{P}grad/early_late_ratio"])  # all keys kept for the diagnosis


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="log must be one of"):
        StabilityCallback(log="verbose")
    with pytest.raises(ValueError, match="every_n_steps"):
        StabilityCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="temperature"):
        StabilityCallback(temperature=2.0)


def test_attention_and_temperature_keys_equal_the_core_on_the_same_batch(tmp_path: Path) -> None:
    from thetascope.monitors.attention import AttentionMonitor
    from thetascope.schedules import TemperatureSchedule

    schedule = TemperatureSchedule(2.0, 1.0, 8)
    cb = StabilityCallback(every_n_steps=2, gradients=False, rows_per_head=64, temperature=schedule)
    trainer, seen = _train(tmp_path, cb, max_grad_norm=1.0)
    rows = [r for r in trainer.state.log_history if f"{P}theta_max" in r]
    assert [r["step"] for r in rows] == [2, 4]
    state = None  # the reference core resumes from its previous measurement, as the callback's core does
    for row in rows:
        step = row["step"]
        weights, inputs = seen[step - 1]
        ref = _reference_model(weights)
        core = AttentionMonitor(ref, rows_per_head=64)
        if state is not None:
            core.load_state_dict(state)  # warm-started power-iteration vectors, row-sampling position
        core.probe.set_temperature(schedule(step - 1))  # the tau of that optimizer step
        with core.capture():
            ref(**inputs)
        expected = core.reduce(core.measure())
        state = core.state_dict()
        assert row[f"{P}temperature"] == pytest.approx(schedule(step - 1))
        keys = [k for k in expected if "/layer_" in k or k == f"{P}theta_max"]
        assert len(keys) > 10
        for key in keys:
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        # and G_l against the SVDs of the slices the model uses (warm power iteration: a lower bound)
        for rec in core.probe.layers:
            w = rec.weights()
            exact = math.prod(
                float(torch.linalg.matrix_norm(m.double(), ord=2)) for m in (w.w_q, w.w_k, w.w_v, w.w_o)
            )
            got = row[f"{P}proj_norm/layer_{rec.index:02d}"]
            assert exact * (1 - 2e-2) <= got <= exact * (1 + 1e-5)


def test_model_without_attention_warns_and_keeps_gradients() -> None:
    from types import SimpleNamespace

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    cb = StabilityCallback()
    with pytest.warns(UserWarning, match="attention not measured"):
        cb.on_train_begin(SimpleNamespace(logging_steps=5), SimpleNamespace(max_steps=10), None, model=model)
    assert cb.att is None
    assert cb.grad is not None
    assert cb._every == 5
    cb.on_train_end(None, SimpleNamespace(is_world_process_zero=True), None)
    assert not model._forward_hooks
